"""The `wm` command end to end, run as users run it (a subprocess), at tiny sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_paths import relative_files, shipped_run_files
from wmlib.config import PRETRAINED_DIR, SAMPLE_DIR
from wmlib.controller import load_controller, to_flat
from wmlib.data import episode_files, load_branches, load_episode
from wmlib.evolve import history
from wmlib.paths import PARTS, SHIPPED, RunPaths
from wmlib.pipeline import digest, evolution_of_final_c, real_frames

ENV = {**os.environ, "WM_PRESET": "smoke"}
pytestmark = pytest.mark.slow  # each test starts `wm` (and JAX) in subprocesses: left out of the quick unit run


def wm(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "wmlib.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"wm {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_collect_writes_resumes_and_is_reproducible(tmp_path):
    args = ["collect", "--policy", "brownian", "--episodes", 4, "--max-steps", 100, "--workers", 2, "--seed", 0]
    out = last_json(wm(*args, "--out", tmp_path / "a"))
    assert out["episodes"] == 4 and out["frames"] == sum(len(load_episode(p)) for p in episode_files(tmp_path / "a"))
    files = episode_files(tmp_path / "a")
    stamps = [p.stat().st_mtime_ns for p in files]
    wm(*args, "--out", tmp_path / "a")  # again: nothing new is written
    assert [p.stat().st_mtime_ns for p in episode_files(tmp_path / "a")] == stamps
    wm(*args, "--out", tmp_path / "b", "--stock")  # same seed, stock renderer: byte-identical frames
    for a, b in zip(files, episode_files(tmp_path / "b")):
        np.testing.assert_array_equal(load_episode(a).frames, load_episode(b).frames)


def test_collect_bad_input_is_one_clear_line(tmp_path):
    proc = wm("collect", "--policy", "randm", "--out", tmp_path, check=False)
    assert proc.returncode != 0
    assert "valid policies: random, brownian, heuristic, recovery, weave, controller" in proc.stderr
    for flag in ("--episodes", "--workers"):
        proc = wm("collect", flag, 0, "--out", tmp_path, check=False)
        assert proc.returncode != 0 and "expected a positive integer, got 0" in proc.stderr
    afile = tmp_path / "file"
    afile.write_text("x")
    proc = wm("collect", "--episodes", 1, "--out", afile, check=False)
    assert proc.returncode == 2 and f"{afile} is a file" in proc.stderr and "Traceback" not in proc.stderr
    proc = wm("collect", "--policy", "controller", "--episodes", 1, "--out", tmp_path / "c", check=False)
    assert proc.returncode == 2 and "needs a trained agent" in proc.stderr


def test_train_rnn_fine_tune_bad_input_names_the_file(tmp_path):
    args = ["train-rnn", "--data", SAMPLE_DIR, "--vae", SHIPPED.vae, "--out", tmp_path / "m"]
    proc = wm(*args, "--init", SHIPPED.vae, check=False)
    assert (proc.returncode == 2
            and f"{SHIPPED.vae} holds a vae checkpoint, expected a mdnrnn" in proc.stderr)
    other_v = tmp_path / "other_vae.eqx"
    other_v.write_bytes(SHIPPED.vae.read_bytes() + b"\0")  # another file: another V id
    proc = wm("train-rnn", "--data", SAMPLE_DIR, "--vae", other_v, "--out", tmp_path / "m",
              "--init", SHIPPED.mdnrnn, check=False)
    assert proc.returncode == 2 and "was trained on latents of V" in proc.stderr and str(other_v) in proc.stderr
    proc = wm(*args, "--reward-asymmetry", -1, check=False)
    assert proc.returncode == 2 and "--reward-asymmetry must be positive, got -1.0" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_branches_and_train_rnn_with_branches_bad_input(tmp_path):
    proc = wm("branches", "--data", SAMPLE_DIR, "--out", tmp_path / "b", check=False)
    assert proc.returncode == 2 and f"{SAMPLE_DIR} has no episodes of recovery, weave to branch" in proc.stderr
    wm("collect", "--policy", "weave", "--episodes", 1, "--max-steps", 110, "--workers", 1, "--out", tmp_path / "d")
    out = last_json(wm("branches", "--data", tmp_path / "d", "--out", tmp_path / "b", "--per-episode", 2,
                       "--horizon", 4, "--workers", 1, "--seed", 3))
    # seed 3 draws branch points 352 and 90: the first lies beyond the 110 recorded steps and is dropped
    assert out["sources"] == 1 and out["branches"] == 1 and out["steps"] == 90 + 4
    out = last_json(wm("branches", "--data", tmp_path / "d", "--out", tmp_path / "late", "--per-episode", 2,
                       "--horizon", 4, "--workers", 1, "--first", 100, "--last", 103, "--drivers", "weave"))
    t0 = load_branches(tmp_path / "late")["weave_1000000.npz"]["t0"]
    assert out["branches"] == 2 and set(t0) <= {100, 101, 102} and out["steps"] == t0.sum() + 2 * 4
    proc = wm("branches", "--data", tmp_path / "d", "--out", tmp_path / "c", "--drivers", "controller", check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'd'} has no episodes of controller to branch" in proc.stderr
    joined = load_branches(tmp_path / "b", tmp_path / "late")["weave_1000000.npz"]
    assert list(joined["t0"]) == [90, *t0] and joined["frames"].shape == (3, 5, 64, 64, 3)
    out = last_json(wm("branches", "--data", tmp_path / "d", "--out", tmp_path / "long", "--per-episode", 1,
                       "--horizon", 5, "--workers", 1, "--first", 100, "--last", 101))
    proc = wm("train-rnn", "--data", SAMPLE_DIR, "--vae", SHIPPED.vae, "--out", tmp_path / "m", "--branches",
              tmp_path / "b", tmp_path / "long", check=False)
    assert proc.returncode == 2 and "its branches last 5 steps, those of weave_1000000.npz in an earlier folder 4" \
        in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = wm("train-rnn", "--data", SAMPLE_DIR, "--vae", SHIPPED.vae, "--out", tmp_path / "m", "--branches",
              tmp_path / "empty", check=False)
    assert proc.returncode == 2 and f"branch folder {tmp_path / 'empty'} holds no branch files" in proc.stderr


def test_select_names_a_missing_m_and_refuses_test_seeds(tmp_path):
    proc = wm("select", "--stage", tmp_path / "s", "--vae", SHIPPED.vae, "--data", SAMPLE_DIR, check=False)
    assert proc.returncode == 2 and f"no M at {tmp_path / 's' / 'mdnrnn' / 'mdnrnn.eqx'}" in proc.stderr
    proc = wm("select", "--stage", tmp_path / "s", "--vae", SHIPPED.vae, "--mdnrnn", SHIPPED.mdnrnn, "--data",
              SAMPLE_DIR, "--seed", 0, "--episodes", 4, check=False)
    assert proc.returncode == 2 and "env seeds 0..3 are not all in the selection range" in proc.stderr
    assert not (tmp_path / "s").exists()  # refused before evolving anything
    proc = wm("select", "--stage", tmp_path / "s", "--vae", SHIPPED.vae, "--data", SAMPLE_DIR, "--pool", -1,
              check=False)
    assert proc.returncode == 2 and "--pool: expected a non-negative integer, got -1" in proc.stderr
    other = PRETRAINED_DIR.parent / "results_dropout"  # an agent folder with the same V and another M
    proc = wm("select", "--stage", tmp_path / "s", "--vae", SHIPPED.vae, "--mdnrnn", SHIPPED.mdnrnn, "--data",
              SAMPLE_DIR, "--incumbent", other, "--preset", "smoke", check=False)
    assert proc.returncode == 2 and f"its M ({other / 'mdnrnn.eqx'}) is not {SHIPPED.mdnrnn}" in proc.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_collect_unwritable_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    proc = wm("collect", "--episodes", 1, "--out", ro / "x", check=False)
    assert proc.returncode == 2 and "cannot create" in proc.stderr


def test_evaluate_prints_the_json_line_and_names_missing_parts(tmp_path):
    result = last_json(wm("evaluate", "--agent", PRETRAINED_DIR, "--episodes", 2, "--seed", 5, "--max-steps", 40,
                          "--workers", 2, "--video", tmp_path / "videos", "--filmstrip"))
    assert result["episodes"] == 2 and result["seed"] == 5 and len(result["scores"]) == 2
    assert result["mean"] == pytest.approx(np.mean(result["scores"]))
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 2
    assert len(list((tmp_path / "videos" / "episodes").glob("*_worst.png"))) == 2
    kept = last_json(wm("evaluate", "--agent", PRETRAINED_DIR, "--episodes", 1, "--seed", 5, "--max-steps", 40,
                        "--workers", 1, "--save", tmp_path / "kept"))  # --save alone keeps the episodes
    episode = load_episode(tmp_path / "kept" / "agent_000005.npz")
    assert len(episode) == 40 and episode.total_reward == pytest.approx(kept["scores"][0], abs=1e-3)
    partial = tmp_path / "agent"
    partial.mkdir()
    (partial / "vae.eqx").write_bytes(SHIPPED.vae.read_bytes())
    proc = wm("evaluate", "--agent", partial, "--episodes", 1, check=False)
    assert proc.returncode == 2 and "has no M (mdnrnn.eqx is missing)" in proc.stderr
    proc = wm("evaluate", "--agent", PRETRAINED_DIR, "--episodes", 0, check=False)
    assert proc.returncode != 0 and "positive integer" in proc.stderr


def test_evolve_in_the_real_environment_resumes(tmp_path):
    args = ["evolve", "--agent", PRETRAINED_DIR, "--where", "real", "--out", tmp_path, "--popsize", 3,
            "--max-steps", 20, "--workers", 2, "--init", SHIPPED.agent_part("C")]
    first = last_json(wm(*args, "--generations", 1))
    resumed = last_json(wm(*args, "--generations", 2))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [1, 2]
    assert all(r["real_frames"] == 3 * 2 * 20 for r in records)  # popsize x repeats x steps, counted
    assert resumed["best_return"] >= first["best_return"]


def test_dream_sweep_writes_the_table_and_resumes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in episode_files(SAMPLE_DIR)[:2]:
        (data / path.name).write_bytes(path.read_bytes())
    wm("encode", "--data", data, "--vae", SHIPPED.vae)
    args = ["dream-sweep", "--agent", PRETRAINED_DIR, "--data", data, "--out", tmp_path / "sweep",
            "--setting", "inputs", "--values", "z,zh", "--runs", 2, "--generations", 1, "--popsize", 4,
            "--repeats", 1, "--episodes", 2, "--max-steps", 20, "--workers", 1]
    first = last_json(wm(*args))
    table = json.loads((tmp_path / "sweep" / "inputs_sweep.json").read_text())
    assert table["value"] == first["value"] == ["z", "z", "zh", "zh"] and table["run_seed"] == [0, 1, 0, 1]
    assert [len(s) for s in table["scores"]] == [2] * 4 and table["episodes"] == 2 and table["max_steps"] == 20
    np.testing.assert_allclose(np.mean(table["scores"], axis=1), table["real_mean"])
    assert all(np.isfinite(table["dream_mean"])) and all(s > 0 for s in table["dream_std"])
    w_h = history(tmp_path / "sweep" / "inputs_z" / "seed_1")["mean"][-1][:-3].reshape(3, -1)[:, 32:]
    assert not w_h.any()  # C on z alone: every weight on h stayed at zero
    again = last_json(wm(*args))
    assert again == first  # resumed: the evolutions are done, the same C is scored on the same tracks
    for run in ("z/seed_0", "z/seed_1", "zh/seed_0", "zh/seed_1"):
        lines = (tmp_path / "sweep" / f"inputs_{run}" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1  # one generation each, not rerun
    bad = wm(*args[:9], "--values", "z,hz", *args[11:], check=False)
    assert bad.returncode != 0 and "evolve.inputs" in bad.stderr and "'hz'" in bad.stderr
    assert "no setting 'temp'" in wm(*args[:7], "--setting", "temp", *args[9:], check=False).stderr


def test_pipeline_smoke_runs_every_stage_and_resumes(tmp_path, tmp_path_factory):
    proc = wm("pipeline", "--preset", "smoke", "--run", tmp_path, "--workers", 2)
    assert "real mean +- std" in proc.stdout and "iter_1" in proc.stdout
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert {"collect", "vae", "encode", "mdnrnn", "evolve", "evaluate", "iter_1/evaluate"} <= set(stages)
    for part in ("vae.eqx", "mdnrnn.eqx", "controller.eqx"):
        assert (tmp_path / "iter_1" / "agent" / part).exists()
    # C was chosen by selection-range episodes, and every real frame the method drove is counted:
    # 4 + 4 episodes of 60 steps (mirror images are not new frames), 2 x 2 candidates x 1 episode
    assert {"select", "iter_1/select"} <= set(stages)
    frames = real_frames(tmp_path)
    assert (frames["data"], frames["selection"], frames["total"]) == (8 * 60, 4 * 60, 12 * 60)
    assert f"used by the method in all (data, branches, real checks, selection of C): {12 * 60}" in proc.stdout
    again = wm("pipeline", "--preset", "smoke", "--run", tmp_path, "--workers", 2)
    assert "done earlier" in again.stdout  # resumed: every stage skipped
    # one command reproduces its agent: a second run from nothing makes the same V, M and C, byte for byte,
    # and the same real scores (one worker, so the split of episodes between processes plays no part either)
    twin = tmp_path_factory.mktemp("twin")
    wm("pipeline", "--preset", "smoke", "--run", twin, "--workers", 1)
    for part in PARTS:
        assert RunPaths(twin).final().agent_part(part).read_bytes() == RunPaths(tmp_path).final().agent_part(
            part).read_bytes(), part
    assert RunPaths(twin).final().eval.read_text() == RunPaths(tmp_path).final().eval.read_text()
    # `wm export` lays the final agent out exactly as the shipped one is: the last iteration's agent
    # (with its selection of C), with the run's V
    out = Path(last_json(wm("export", "--run", tmp_path, "--out", tmp_path / "export"))["out"])
    assert relative_files(out) == shipped_run_files()
    final, exported = RunPaths(tmp_path).iteration(1), RunPaths(out)
    for part in PARTS:
        assert exported.agent_part(part).read_bytes() == final.agent_part(part).read_bytes()
    assert exported.vae.read_bytes() == final.agent_part("V").read_bytes() == RunPaths(tmp_path).vae.read_bytes()
    assert exported.eval.read_text() == final.eval.read_text()
    # a recipe grows the run by wm command lines (the results preset's branch rounds): branches of the
    # agent's own episodes, two Ms fine-tuned with them (seeds 0 and 1), two evolutions in each M's dream,
    # all chosen between by reality, a round 2 with round 1's C as the incumbent, the test
    train = ("train-rnn --data {run}/data --vae {run}/vae/vae.eqx --out {run}/iter_2/%s --init "
             "{run}/iter_1/agent/mdnrnn.eqx --epochs 1 --preset smoke --branches {run}/iter_2/branches "
             "--set rnn.seed=%d")
    recipe = ",".join((
        "branches --data {run}/data --out {run}/iter_2/branches --drivers controller --per-episode 1 --first 44 "
        "--last 48 --horizon 8",
        train % ("mdnrnn", 0), train % ("mdnrnn_1", 1),
        "select --stage {run}/iter_2 --mdnrnn {run}/iter_2/mdnrnn/mdnrnn.eqx {run}/iter_2/mdnrnn_1/mdnrnn.eqx "
        "--vae {run}/vae/vae.eqx --data {run}/data --runs 2 --episodes 1 --max-steps 60 --pool 1 --preset smoke",
        "select --stage {run}/iter_3 --mdnrnn {run}/iter_2/agent/mdnrnn.eqx --incumbent {run}/iter_2/agent "
        "--vae {run}/vae/vae.eqx --data {run}/data --runs 1 --episodes 1 --max-steps 60 --preset smoke",
        "evaluate --agent {run}/iter_2/agent --episodes 2 --max-steps 60 --out {run}/iter_2/eval.json"))
    proc = wm("pipeline", "--preset", "smoke", "--run", tmp_path, "--workers", 2, "--set", f"recipe={recipe}")
    assert "done earlier" in proc.stdout and "iter_2" in proc.stdout
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert {"recipe_1/branches", "recipe_3/train-rnn", "recipe_4/select", "recipe_5/select",
            "recipe_6/evaluate"} <= set(stages)
    # a round with an incumbent: iter_2's C is a candidate beside the new evolution's, driven on the same track
    it3 = RunPaths(tmp_path).iteration(3)
    third = json.loads(it3.selection.read_text())
    assert [c["name"] for c in third["candidates"]] == ["seed_0", "incumbent"]
    params = [np.asarray(to_flat(load_controller(RunPaths(tmp_path).iteration(k).agent_part("C"))[0]), np.float32)
              for k in (2, 3)]
    assert third["candidates"][1]["controller_sha256"] == digest(params[0].tobytes())
    assert np.array_equal(params[0], params[1]) == (third["chosen"] == "incumbent")
    it = RunPaths(tmp_path).iteration(2)
    selection = json.loads(it.selection.read_text())
    # two Ms: each its own choice (m_0/, m_1/: two evolutions and the dream's pick of their earlier means),
    # and reality's best of all six candidates, with the M it was evolved in, is the agent
    ms = [str(it.mdnrnn), str(it.root / "mdnrnn_1" / "mdnrnn.eqx")]
    assert set(selection["reference_dream_return"]) == set(ms)
    rows = selection["candidates"]
    for k, m in enumerate(ms):
        own = json.loads(RunPaths(it.root / f"m_{k}").selection.read_text())
        assert own["mdnrnn"] == m and own["frames"] == 3 * 60
        names = [c["name"] for c in own["candidates"]]
        assert names[:2] == ["seed_0", "seed_1"] and names[2] in ("seed_0/gen_1", "seed_1/gen_1")
        assert [r for r in rows if r["name"].startswith(f"m_{k}/")] == [
            {**r, "name": f"m_{k}/{r['name']}"} for r in own["candidates"]]
        assert all(np.isfinite(c["dream_return"]) for c in own["candidates"])
        pooled = history(RunPaths(it.root / f"m_{k}").evolve_dir / names[2].split("/")[0])["mean"][0]
        assert own["candidates"][2]["controller_sha256"] == digest(np.asarray(pooled, np.float32).tobytes())
    assert len(rows) == 6 and selection["frames"] == 6 * 60
    best = max(rows, key=lambda r: r["real_mean"])
    assert selection["chosen"] == best["name"]
    sub, chosen_run = RunPaths(it.root / best["name"].split("/")[0]), best["name"].split("/")[1]
    assert selection["mdnrnn"] == ms[int(sub.root.name[2:])]
    assert it.agent_part("M").read_bytes() == Path(selection["mdnrnn"]).read_bytes()
    assert it.evolve_metrics.read_text() == (sub.evolve_dir / chosen_run / "metrics.jsonl").read_text()
    assert it.agent_part("C").read_bytes() == it.selected.read_bytes() == sub.selected.read_bytes()
    assert evolution_of_final_c(RunPaths(tmp_path)) == sub.evolve_dir / chosen_run  # iter_2 is the final stage
    branches = load_branches(it.root / "branches")
    assert len(branches) == 2  # iter_1's two controller episodes, one branch each
    frames = real_frames(tmp_path)
    assert frames["branches"] == sum(int(b["t0"][0]) + 8 for b in branches.values())
    assert frames["selection"] == 4 * 60 + 6 * 60 + 2 * 60
    assert frames["total"] == 12 * 60 + 6 * 60 + 2 * 60 + frames["branches"]
    assert json.loads(it.eval.read_text())["episodes"] == 2
    assert RunPaths(tmp_path).final().root == it.root
    # exported, the agent's M comes with the log of the folder it was trained in
    shipped = RunPaths(last_json(wm("export", "--run", tmp_path, "--out", tmp_path / "export_2"))["out"])
    assert shipped.mdnrnn.read_bytes() == Path(selection["mdnrnn"]).read_bytes()
    assert shipped.mdnrnn_metrics.read_text() == (Path(selection["mdnrnn"]).parent / "metrics.jsonl").read_text()
    proc = wm("pipeline", "--preset", "tiny", "--run", tmp_path, check=False)
    assert proc.returncode == 2 and "valid presets: smoke, quick, full" in proc.stderr
