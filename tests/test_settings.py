"""Settings by name (`section.field=value`, `wm ... --set`), a run's config.json written once, and the
`wm` command's errors: user errors (`WMError`, OSError) are one line, anything else is a bug and keeps
its traceback. In-process (`cli.main`) with the stages replaced, so nothing is trained."""

import json
import types

import pytest

from wmlib import cli, pipeline
from wmlib.config import (PRESETS, PRETRAINED_DIR, EvolveConfig, RNNConfig, changed_settings, get_preset,
                          parse_settings, preset_from_dict, setting_types, with_settings)
from wmlib.errors import WMError


@pytest.fixture(autouse=True)
def _leave_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("WM_MALLOC", "default")  # cli.main would tune this pytest process's malloc


def test_every_field_of_every_section_is_a_setting():
    names = setting_types()
    smoke = PRESETS["smoke"]
    for section in ("collect", "vae", "rnn", "evolve", "evaluate"):
        for field in type(getattr(smoke, section)).__dataclass_fields__:
            assert f"{section}.{field}" in names
    assert "iterations" in names and "name" not in names


def test_values_are_read_by_the_field_type():
    s = parse_settings(["evolve.generations=1", "evolve.sigma0=0.25", "vae.learning_rate=3e-4", "rnn.w_mdn=2",
                        "rnn.offroad_done=no", "evolve.road_starts=TRUE", "collect.mirror=0", "evolve.start=real",
                        "collect.policies=brownian, heuristic", "collect.episodes=3,4", "iterations=2",
                        "collect.iteration_policies="])
    assert s == {"evolve.generations": 1, "evolve.sigma0": 0.25, "vae.learning_rate": 3e-4, "rnn.w_mdn": 2.0,
                 "rnn.offroad_done": False, "evolve.road_starts": True, "collect.mirror": False,
                 "evolve.start": "real", "collect.policies": ("brownian", "heuristic"), "collect.episodes": (3, 4),
                 "iterations": 2, "collect.iteration_policies": ()}
    assert type(s["rnn.w_mdn"]) is float and type(s["evolve.generations"]) is int
    assert parse_settings(["evolve.tau=0.5", "evolve.tau=1.5"]) == {"evolve.tau": 1.5}  # the last one wins
    smoke = get_preset("smoke")
    changed = with_settings(smoke, s)
    assert changed.evolve.generations == 1 and changed.collect.policies == ("brownian", "heuristic")
    assert changed.iterations == 2 and changed.evolve.popsize == smoke.evolve.popsize  # the rest is kept
    assert changed.rnn.seq_len == smoke.rnn.seq_len and smoke.evolve.generations == 2  # the preset is untouched


@pytest.mark.parametrize("text, words", [
    ("evolve.generations=x", ["evolve.generations", "an integer (int)", "'x'"]),
    ("iterations=1.5", ["iterations", "an integer (int)"]),
    ("evolve.sigma0=big", ["evolve.sigma0", "a number (float)"]),
    ("rnn.sample_z=maybe", ["rnn.sample_z", "true or false (bool)"]),
    ("collect.episodes=1,a", ["collect.episodes", "comma-separated values, each an integer (int)"]),
    ("evolve.generation=3", ["evolve.generation", "evolve has no setting 'generation'", "generations, episode_len"]),
    ("evolv.tau=1", ["evolv.tau", "no such setting", "collect, vae, rnn, evolve, evaluate"]),
    ("generations", ["expected section.field=value"]),
    ("name=quick", ["the preset's name is not a setting"]),
])
def test_a_bad_setting_names_the_field_and_what_it_expects(text, words):
    with pytest.raises(WMError) as err:
        parse_settings([text])
    assert isinstance(err.value, ValueError)  # `except ValueError` around library calls still catches it
    for w in words:
        assert w in str(err.value)
    assert "--" not in str(err.value)  # the library speaks of settings, not of command-line flags


def test_a_stored_config_reads_back_and_older_ones_take_the_defaults():
    preset = with_settings(get_preset("smoke"), {"evolve.generations": 1, "collect.policies": ["random"]})
    assert preset.collect.policies == ("random",)
    stored = json.loads(json.dumps(preset.to_dict()))  # tuples come back as lists
    assert preset_from_dict(stored) == preset
    del stored["rnn"]["dropout"], stored["evolve"]["tau"]  # a run from before these settings existed
    stored["vae"]["retired"] = 3  # and one that no longer exists
    old = preset_from_dict(stored)
    assert old.rnn.dropout == RNNConfig().dropout and old.evolve.tau == EvolveConfig().tau
    assert changed_settings(old, preset) == []


def test_changed_settings_lists_each_difference_and_lets_growable_ones_grow():
    smoke = get_preset("smoke")
    other = with_settings(smoke, {"evolve.generations": 1, "rnn.offroad_done": False, "iterations": 3})
    assert changed_settings(smoke, other) == ["rnn.offroad_done: True -> False", "evolve.generations: 2 -> 1",
                                              "iterations: 1 -> 3"]
    assert changed_settings(smoke, other, growable=["iterations"]) == ["rnn.offroad_done: True -> False",
                                                                         "evolve.generations: 2 -> 1"]
    assert changed_settings(other, smoke, growable=["iterations"])[-1] == "iterations: 3 -> 1"  # shrinking: no
    assert changed_settings(smoke, get_preset("quick"))[0] == "name: 'smoke' -> 'quick'"
    # a recipe grows by lines added after the same ones; any other change is a change
    one, two = (with_settings(smoke, {"recipe": lines}) for lines in (("encode a",), ("encode a", "encode b")))
    assert changed_settings(one, two, growable=["recipe"]) == []
    assert changed_settings(two, one, growable=["recipe"]) == ["recipe: ('encode a', 'encode b') -> ('encode a',)"]
    other_first = with_settings(smoke, {"recipe": ("encode c", "encode b")})
    assert changed_settings(one, other_first, growable=["recipe"]) == \
        ["recipe: ('encode a',) -> ('encode c', 'encode b')"]


@pytest.fixture
def stages(monkeypatch):
    """The pipeline's stages replaced by recorders: what each saw of the preset."""
    seen: dict[str, list] = {"train": [], "iterate": []}
    monkeypatch.setattr(pipeline, "train_stages", lambda run, preset, *a, **k: seen["train"].append(preset))
    monkeypatch.setattr(pipeline, "iterate", lambda run, i, preset, *a, **k: seen["iterate"].append((i, preset)))
    monkeypatch.setattr(pipeline, "summary", lambda run: ([], {}))
    return seen


def test_a_set_value_reaches_the_stages_and_config_json_is_written_once(tmp_path, stages, capsys):
    run = tmp_path / "run"
    args = ["pipeline", "--preset", "smoke", "--run", str(run), "--set", "evolve.generations=1",
            "--set", "rnn.dropout=0.05"]
    assert cli.main(args) == 0
    preset = stages["train"][-1]
    assert (preset.evolve.generations, preset.rnn.dropout, preset.evolve.popsize) == (1, 0.05, 8)
    assert stages["iterate"] == [(1, preset)]
    config = run / "config.json"
    assert preset_from_dict(json.loads(config.read_text())) == preset
    stamp = config.stat().st_mtime_ns
    assert cli.main(args) == 0  # the same settings: resumed, config.json not rewritten
    assert config.stat().st_mtime_ns == stamp
    capsys.readouterr()

    # other settings: refused, naming every difference, before any stage runs
    calls = len(stages["train"])
    assert cli.main(["pipeline", "--preset", "smoke", "--run", str(run), "--set", "rnn.dropout=0.05"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "evolve.generations: 1 -> 2" in err and "rnn.dropout" not in err and str(run) in err
    assert cli.main(["pipeline", "--preset", "quick", "--run", str(run)]) == 2
    assert "name: 'smoke' -> 'quick'" in capsys.readouterr().err
    assert len(stages["train"]) == calls and config.stat().st_mtime_ns == stamp

    # more sim2real iterations may follow on a resume (config.json records them); fewer may not
    assert cli.main([*args, "--set", "iterations=2"]) == 0
    assert [i for i, _ in stages["iterate"][-2:]] == [1, 2] and json.loads(config.read_text())["iterations"] == 2
    assert cli.main(args) == 2
    assert "iterations: 2 -> 1" in capsys.readouterr().err

    # `wm iterate` continues with the run's own settings, not its preset's defaults
    assert cli.main(["iterate", "--run", str(run)]) == 0
    i, again = stages["iterate"][-1]
    assert again.evolve.generations == 1 and again.iterations == 2


def test_set_and_named_options_reach_evolve(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_evolve(agent, data, vae_id, out, cfg, **kwargs):
        seen.append(cfg)
        return types.SimpleNamespace(best_return=1.0, generations=cfg.generations)

    monkeypatch.setattr(pipeline, "evolve_in_dream", fake_evolve)
    assert cli.main(["evolve", "--agent", str(PRETRAINED_DIR), "--data", str(tmp_path), "--out", str(tmp_path / "e"),
                     "--preset", "smoke", "--set", "evolve.tau=1.3", "--set", "evolve.road_starts=false",
                     "--set", "evolve.generations=7", "--generations", "3"]) == 0
    cfg = seen[-1]
    assert (cfg.tau, cfg.road_starts, cfg.generations, cfg.popsize) == (1.3, False, 3, 8)  # the named flag wins
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generations"] == 3


def test_a_bad_set_is_one_line_naming_the_option(tmp_path, capsys):
    assert cli.main(["pipeline", "--preset", "smoke", "--run", str(tmp_path), "--set", "evolve.generation=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wm pipeline: error: --set evolve.generation: evolve has no setting 'generation'")
    assert err.count("\n") == 1 and not (tmp_path / "config.json").exists()
    assert cli.main(["train-vae", "--data", "d", "--out", "o", "--set", "vae.steps=many"]) == 2
    assert "--set vae.steps: expected an integer (int), got 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("bug", [KeyError("stage"), RuntimeError("broken invariant"), ValueError("shape mismatch"),
                                 TypeError("bad call")])
def test_a_bug_propagates_with_its_traceback(tmp_path, monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(pipeline, "run_pipeline", broken)
    with pytest.raises(type(bug)) as err:
        cli.main(["pipeline", "--preset", "smoke", "--run", str(tmp_path)])
    assert err.value is bug


def test_a_user_error_from_a_stage_is_one_line(tmp_path, monkeypatch, capsys):
    def refuses(*args, **kwargs):
        raise WMError(f"{tmp_path}/x.eqx holds a vae checkpoint, expected a mdnrnn")

    monkeypatch.setattr(pipeline, "run_pipeline", refuses)
    assert cli.main(["pipeline", "--preset", "smoke", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"wm pipeline: error: {tmp_path}/x.eqx holds a vae checkpoint, expected a mdnrnn\n"
