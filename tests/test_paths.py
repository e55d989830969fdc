"""A run's layout (`wmlib.paths.RunPaths`): the shipped agent is laid out as a run, and an agent folder
or a run folder both load as an agent."""

import shutil
from pathlib import Path

import pytest

from wmlib.agent import Agent, agent_folder, part_path
from wmlib.config import PRETRAINED_DIR
from wmlib.paths import PARTS, SHIPPED, RunPaths, find_artifact

NOT_RUN = ("README.md", "episodes", "tau_sweep.json", "inputs_sweep.json")  # shipped beside the run, not made by it


def relative_files(folder: Path) -> set[str]:
    """Every file under `folder`, as paths relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def shipped_run_files() -> set[str]:
    """The files of data/pretrained that a run made (what `wm export` writes)."""
    return {f for f in relative_files(PRETRAINED_DIR) if f.split("/")[0] not in NOT_RUN}


def test_the_shipped_agent_is_laid_out_as_a_run():
    named = [SHIPPED.config, SHIPPED.summary, SHIPPED.eval, SHIPPED.vae, SHIPPED.vae_metrics, SHIPPED.mdnrnn,
             SHIPPED.mdnrnn_metrics, SHIPPED.evolve_metrics, SHIPPED.selection,
             *(SHIPPED.agent_part(p) for p in PARTS)]
    assert {p.relative_to(PRETRAINED_DIR).as_posix() for p in named} == shipped_run_files()
    assert SHIPPED.agent_part("V").read_bytes() == SHIPPED.vae.read_bytes()  # the agent is made of the run's V, M
    assert SHIPPED.agent_part("M").read_bytes() == SHIPPED.mdnrnn.read_bytes()
    assert SHIPPED.final() == SHIPPED


def test_final_is_the_last_evaluated_iteration_in_numeric_order(tmp_path):
    run = RunPaths(tmp_path)
    assert run.final() == run
    for k in (1, 2, 10):
        run.iteration(k).root.mkdir()
    (tmp_path / "iter_x").mkdir()  # not an iteration
    assert [it.root.name for it in run.iterations()] == ["iter_1", "iter_2", "iter_10"]
    for k in (2, 10):
        run.iteration(k).eval.write_text("{}")
    assert run.final() == run.iteration(10)
    assert run.final().mdnrnn == tmp_path / "iter_10" / "mdnrnn" / "mdnrnn.eqx"


def test_an_agent_folder_or_a_run_folder_loads_as_an_agent(tmp_path):
    assert agent_folder(SHIPPED.agent_dir) == SHIPPED.agent_dir
    assert agent_folder(PRETRAINED_DIR) == SHIPPED.agent_dir
    assert part_path(PRETRAINED_DIR, "C") == SHIPPED.agent_part("C")
    run = RunPaths(tmp_path / "run")
    shutil.copytree(SHIPPED.agent_dir, run.iteration(1).agent_dir)
    run.iteration(1).eval.write_text("{}")
    assert agent_folder(run.root) == run.iteration(1).agent_dir  # a run's final agent
    assert Agent.load(run.root).controller.weight.shape == Agent.load(SHIPPED.agent_dir).controller.weight.shape
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is neither an agent folder .* nor a run folder"):
        agent_folder(tmp_path)


def test_find_artifact_takes_the_first_that_exists(tmp_path):
    assert find_artifact(RunPaths(tmp_path).vae, SHIPPED.vae) == SHIPPED.vae
    with pytest.raises(FileNotFoundError, match="none of .*vae.eqx exists"):
        find_artifact(RunPaths(tmp_path).vae)
