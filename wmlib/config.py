"""Presets: every size of every stage, as frozen dataclasses.

`smoke` makes each notebook finish in about a minute on 2 CPU cores (the tests set it),
`quick` is sized for a laptop CPU (about an hour end to end), `full` is paper scale for a GPU.
`WM_PRESET` selects one; `get_preset()` reads it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wmlib.errors import WMError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRETRAINED_DIR = PROJECT_ROOT / "data" / "pretrained"
SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"


# ---- env seeds: three disjoint ranges, defined here once ------------------------------------------
# Every real CarRacing episode runs on an env seed (its track). A score on tracks the method trained on,
# or chose its controller on, is not a result, so each use has its own range:
#   training   data collection and the sim2real iterations' collections
#   selection  any real episode used to choose, stop or tune (real checks during evolution, picking C)
#   test       reported scores only (README and eval.json: seeds 0..99)
SEED_RANGES: dict[str, range] = {
    "test": range(0, 100_000),
    "selection": range(100_000, 1_000_000),
    "training": range(1_000_000, 2**31 - 1),
}
TRAINING_SEED = SEED_RANGES["training"].start
SELECTION_SEED = SEED_RANGES["selection"].start


def check_seeds(use: str, first: int, count: int, what: str) -> None:
    """Refuse env seeds first..first+count-1 for `use` ("training", "selection", "test") unless they
    all lie in that use's range; `what` names the setting in the error."""
    if use not in SEED_RANGES:
        raise ValueError(f"unknown seed use {use!r}; valid: {', '.join(SEED_RANGES)}")
    r = SEED_RANGES[use]
    if count < 1 or first not in r or first + count - 1 not in r:
        raise WMError(f"{what}: env seeds {first}..{first + count - 1} are not all in the {use} range "
                         f"{r.start}..{r.stop - 1} (the ranges: " +
                         ", ".join(f"{k} {v.start}..{v.stop - 1}" for k, v in SEED_RANGES.items()) + ")")


def runs_dir() -> Path:
    """Where runs are written: `WM_RUNS`, else `runs/` at the project root (gitignored)."""
    return Path(os.environ.get("WM_RUNS", PROJECT_ROOT / "runs"))


@dataclass(frozen=True)
class CollectConfig:
    """Real-environment data collection (paper: 10,000 random-policy rollouts).

    Policy k collects `episodes[k]` episodes (default `episodes_per_policy` each) on training env
    seeds from `seed + 100_000 * k`; sim2real iteration i collects `iteration_episodes` episodes of
    each of `iteration_policies` (the agent itself is "controller") after those."""
    policies: tuple[str, ...] = ("brownian", "recovery", "heuristic", "random")
    episodes_per_policy: int = 12
    episodes: tuple[int, ...] = ()
    iteration_policies: tuple[str, ...] = ("controller", "recovery")
    iteration_episodes: int = 12
    max_steps: int = 1000
    seed: int = TRAINING_SEED
    mirror: bool = True

    def plan(self) -> list[tuple[str, int]]:
        """[(policy, episodes)] of the initial collection."""
        if self.episodes and len(self.episodes) != len(self.policies):
            raise WMError(f"collect.episodes has {len(self.episodes)} entries for {len(self.policies)} policies")
        return list(zip(self.policies, self.episodes or (self.episodes_per_policy,) * len(self.policies)))


@dataclass(frozen=True)
class VAEConfig:
    """ConvVAE (paper appendix): z=32, Adam 1e-4, batch 100, KL free bits 0.5 per dim."""
    z_dim: int = 32
    batch_size: int = 100
    learning_rate: float = 1e-4
    kl_tolerance: float = 0.5
    steps: int = 3000
    val_episodes: int = 2
    val_frames: int = 500
    mirror: bool = True
    eval_every: int = 500
    seed: int = 0


@dataclass(frozen=True)
class RNNConfig:
    """MDN-RNN: LSTM(256), 5 Gaussians, reward and done heads, Adam 1e-3, grad clip 1.0."""
    hidden: int = 256
    n_mix: int = 5
    seq_len: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    grad_clip: float = 1.0
    w_mdn: float = 1.0
    w_reward: float = 10.0
    w_done: float = 10.0
    reward_asymmetry: float = 1.0
    reward_floor: float = -1.0     # reward targets below are raised to it (the -100 of leaving the map)
    offroad_done: bool = False     # the done head learns "off the road next step" (the dream ends there)
    done_pos_weight: float = 1.0   # weight of the rare positive done targets in the BCE
    dropout: float = 0.0           # dropout on the LSTM's inputs and recurrent state in training
    sample_z: bool = True          # learn from z ~ N(mu, sigma^2) (the paper) or from V's means mu
    overshoot: int = 0             # K open-loop steps in the loss (M feeds back its expected z; 0: off)
    w_overshoot: float = 1.0       # weight of that K-step NLL
    w_branch: float = 1.0          # weight of the branch term (`mdnrnn.branch_loss`), when branches are given
    branch_warmup: int = 40        # real steps M warms up on before a branch point
    epochs: int = 20
    val_episodes: int = 2
    seed: int = 0


CONTROLLER_INPUTS = ("zh", "z")  # C reads z and M's h (the full model), or z alone (the paper's "V model only")


@dataclass(frozen=True)
class EvolveConfig:
    """CMA-ES in the dream (paper: population 64, 16 rollouts per candidate)."""
    popsize: int = 64
    repeats: int = 16
    sigma0: float = 0.1
    generations: int = 50
    episode_len: int = 1000
    tau: float = 1.0
    start: str = "warm"          # "warm": LSTM warmed on real frames; "real": real z, zero h; "zero"
    road_starts: bool = False    # dreams start only at on-road frames (and episode starts), like real ones
    dream_dropout: float = 0.0   # a new dropout mask on M per dream episode (Dropout's Dream Land)
    dream_ends: bool = True      # M's done head ends a dream (False: it goes on, as reality does off the road)
    ensemble: tuple[str, ...] = ()  # more Ms (mdnrnn.eqx paths, same V): a candidate scores in its worst dream
    inputs: str = "zh"           # what C reads: "zh" (z and M's h, the full model) or "z" (V only: W_h held at 0)
    optimizer: str = "pycma"     # or "evosax"
    real_every: int = 10         # score the best on real episodes every K generations (0: never)
    real_episodes: int = 4
    select_candidates: int = 0   # after evolving: the CMA mean and the best candidates of the last
    select_episodes: int = 16    # generations, each on `select_episodes` selection-range real tracks
    real_seed: int = SELECTION_SEED  # env seeds of every real episode that evolution uses
    frame_budget: int = 0        # real-environment fitness: stop once this many real frames are used (0: none)
    seed: int = 0

    def __post_init__(self):
        if self.inputs not in CONTROLLER_INPUTS:
            raise WMError(f"evolve.inputs: C reads one of {CONTROLLER_INPUTS} (z and h, or z alone), "
                          f"got {self.inputs!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Real-environment evaluation of a V+M+C agent."""
    episodes: int = 100
    max_steps: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class Preset:
    name: str
    collect: CollectConfig = field(default_factory=CollectConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    rnn: RNNConfig = field(default_factory=RNNConfig)
    evolve: EvolveConfig = field(default_factory=EvolveConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    iterations: int = 1
    # wm command lines run after the iterations, in order, each a stage ({run}: the run folder): the
    # steps the method took beyond them, e.g. the results preset's branch rounds (`pipeline.run_recipe`)
    recipe: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_RUN = "--data {run}/data --vae {run}/vae/vae.eqx"
_CHOOSE = ("--preset results --set evolve.inputs=z --set evolve.generations=30 --set evolve.popsize=32 "
           "--set evolve.repeats=8 --set evolve.dream_dropout=0.1")
_DRAWS = 3  # round 1 trains its M this many times (seeds 0, 1, ...): draws differ in how well C's evolved there drive


def _m_draw(k: int) -> tuple[str, str]:
    """Round 1's M, draw k: M with dropout (its seed k), then the branches of the recovery and weave episodes."""
    tag, seed = ("", "") if k == 0 else (f"_{k}", f" --set rnn.seed={k}")
    return (f"train-rnn {_RUN} --out {{run}}/iter_2/dropout{tag} --init {{run}}/iter_1/agent/mdnrnn.eqx --epochs 6 "
            f"--dropout 0.05 --preset results{seed}",
            f"train-rnn {_RUN} --out {{run}}/iter_2/mdnrnn{tag} --init {{run}}/iter_2/dropout{tag}/mdnrnn.eqx "
            "--epochs 3 --dropout 0.05 --preset results --branches {run}/iter_2/branches --set rnn.w_branch=10")


RESULTS_RECIPE = (
    # round 1 (iter_2): exogenous steering (weave), M with dropout, then branches of the recovery and
    # weave episodes, three times (seeds); two C's on z alone evolved in each draw's dream, reality chooses
    # among the six on 64 selection tracks (and with it the M)
    "collect --policy weave --episodes 150 --seed 1300000 --out {run}/data --mirror",
    "encode --data {run}/data --vae {run}/vae/vae.eqx --mirror",
    _m_draw(0)[0],
    "branches --data {run}/data --out {run}/iter_2/branches --horizon 48 --per-episode 4 --seed 3",
    _m_draw(0)[1],
    *(line for k in range(1, _DRAWS) for line in _m_draw(k)),
    f"select --stage {{run}}/iter_2 {_RUN} --mdnrnn "
    + " ".join(f"{{run}}/iter_2/mdnrnn{'_' + str(k) if k else ''}/mdnrnn.eqx" for k in range(_DRAWS))
    + f" --runs 2 --episodes 64 {_CHOOSE}",
    "evaluate --agent {run}/iter_2/agent --episodes 100 --seed 0 --out {run}/iter_2/eval.json",
    # round 2 (iter_3): that agent's own episodes join the data (dream starts where it drives); eight C's
    # evolved in 400-step dreams of its M (the horizon lever), and the dream's 8 best earlier search
    # means of those evolutions (the pool): reality chooses among the 16 and round 1's C (the incumbent)
    "collect --policy controller --agent {run}/iter_2/agent --episodes 120 --seed 1500000 --out {run}/data --mirror",
    "encode --data {run}/data --vae {run}/vae/vae.eqx --mirror",
    f"select --stage {{run}}/iter_3 {_RUN} --mdnrnn {{run}}/iter_2/agent/mdnrnn.eqx --incumbent {{run}}/iter_2/agent "
    f"--runs 8 --pool 8 --episodes 64 {_CHOOSE} --set evolve.episode_len=400",
    "evaluate --agent {run}/iter_3/agent --episodes 100 --seed 0 --out {run}/iter_3/eval.json",
)

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        collect=CollectConfig(policies=("brownian", "recovery"), episodes_per_policy=2, iteration_episodes=2,
                              max_steps=60),
        vae=VAEConfig(batch_size=16, steps=20, val_episodes=1, val_frames=32, eval_every=10),
        rnn=RNNConfig(seq_len=16, batch_size=4, epochs=2, val_episodes=1, offroad_done=True, done_pos_weight=5.0),
        evolve=EvolveConfig(popsize=8, repeats=2, generations=2, episode_len=50, real_every=0,
                            real_episodes=1, road_starts=True, select_candidates=2, select_episodes=1),
        evaluate=EvalConfig(episodes=2, max_steps=60),
        iterations=1,
    ),
    "quick": Preset(name="quick"),
    "full": Preset(
        name="full",
        collect=CollectConfig(episodes_per_policy=1000),
        vae=VAEConfig(steps=100_000, val_episodes=20, val_frames=5000, eval_every=5000),
        rnn=RNNConfig(batch_size=100, epochs=40, val_episodes=20),
        evolve=EvolveConfig(generations=300, real_every=25, real_episodes=16),
        evaluate=EvalConfig(episodes=100),
        iterations=3,
    ),
    # the shipped agent: a run of 1 sim2real iteration, then its recipe (data/pretrained/README.md)
    "results": Preset(
        name="results",
        collect=CollectConfig(policies=("recovery", "heuristic", "brownian"), episodes=(200, 60, 100),
                              iteration_policies=("controller", "recovery"), iteration_episodes=50),
        vae=VAEConfig(steps=4000),
        rnn=RNNConfig(seq_len=200, epochs=12, offroad_done=True, done_pos_weight=5.0, reward_asymmetry=2.0),
        evolve=EvolveConfig(generations=100, episode_len=200, road_starts=True, real_every=0, select_candidates=4,
                            select_episodes=16),
        evaluate=EvalConfig(episodes=100),
        iterations=1,
        recipe=RESULTS_RECIPE,
    ),
}


def get_preset(name: str | None = None) -> Preset:
    """The preset called `name`, else the one named by `WM_PRESET`, else `quick`."""
    source = "argument" if name else "WM_PRESET"
    name = name or os.environ.get("WM_PRESET") or "quick"
    if name not in PRESETS:
        raise WMError(f"unknown preset {name!r} (from {source}); valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# ---- settings by name: "section.field=value" --------------------------------------------------------
# Every field of every section of a preset (and the preset's own `iterations`) is a setting called
# "section.field" ("iterations" for the top level): `parse_settings` reads "name=value" texts by the
# field's type, `with_settings` applies them, `changed_settings` compares a stored run's with a new one.

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_KINDS = {bool: "true or false (bool)", int: "an integer (int)", float: "a number (float)", str: "text (str)"}


def setting_types() -> dict[str, Any]:
    """Every setting of a preset by name ("evolve.generations", "iterations") -> the field's type."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(Preset)
    for f in dataclasses.fields(Preset):
        if f.name == "name":
            continue
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            inner = typing.get_type_hints(section)
            out.update({f"{f.name}.{g.name}": inner[g.name] for g in dataclasses.fields(section)})
        else:
            out[f.name] = section
    return out


def _describe(typ: Any) -> str:
    if typing.get_origin(typ) is tuple:
        return f"comma-separated values, each {_describe(typing.get_args(typ)[0])}"
    return _KINDS.get(typ, str(typ))


def _setting_type(name: str) -> Any:
    types = setting_types()
    if name in types:
        return types[name]
    if name == "name":
        raise WMError("name: the preset's name is not a setting; choose another preset instead")
    section, _, field_name = name.rpartition(".")
    sections = list(dict.fromkeys(k.split(".")[0] for k in types if "." in k))
    if section in sections:
        fields = [k.split(".", 1)[1] for k in types if k.startswith(section + ".")]
        raise WMError(f"{name}: {section} has no setting {field_name!r}; its settings: {', '.join(fields)}")
    raise WMError(f"{name}: no such setting; settings are section.field with section one of "
                  f"{', '.join(sections)}, or {', '.join(k for k in types if '.' not in k)}")


def parse_value(name: str, text: str) -> Any:
    """The text `text` read as the value of setting `name` by its field's type: bool (true/false,
    yes/no, on/off, 1/0), int, float, str, or a tuple as comma-separated items (empty: ())."""
    typ = _setting_type(name)
    if typing.get_origin(typ) is tuple:
        item = typing.get_args(typ)[0]
        parts = [t.strip() for t in text.split(",")] if text.strip() else []
        try:
            return tuple(_parse(item, t) for t in parts)
        except ValueError:
            raise WMError(f"{name}: expected {_describe(typ)}, got {text!r}") from None
    try:
        return _parse(typ, text)
    except ValueError:
        raise WMError(f"{name}: expected {_describe(typ)}, got {text!r}") from None


def _parse(typ: Any, text: str) -> Any:
    if typ is bool:
        if text.strip().lower() not in _TRUE + _FALSE:
            raise ValueError(text)
        return text.strip().lower() in _TRUE
    if typ in (int, float):
        return typ(text)
    if typ is str:
        return text
    raise TypeError(f"settings of type {typ} cannot be read from text")


def parse_settings(texts: Iterable[str]) -> dict[str, Any]:
    """"section.field=value" texts -> {"section.field": value}, each value read by its field's type
    (`parse_value`); an unknown setting or a value of the wrong type is a `WMError` naming the setting
    and what it expects. A later text for the same setting wins."""
    out = {}
    for text in texts:
        name, eq, value = text.partition("=")
        if not eq or not name.strip():
            raise WMError(f"{text!r} is not a setting: expected section.field=value, e.g. evolve.generations=10")
        out[name.strip()] = parse_value(name.strip(), value)
    return out


def with_settings(preset: Preset, settings: Mapping[str, Any]) -> Preset:
    """`preset` with `settings` {"section.field": value} changed (text values are read by the field's
    type, lists become tuples); an unknown setting is a `WMError` that lists the valid ones."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for name, value in settings.items():
        typ = _setting_type(name)
        if isinstance(value, str) and typ is not str:
            value = parse_value(name, value)
        elif isinstance(value, list):
            value = tuple(value)
        section, _, field_name = name.rpartition(".")
        if section:
            sections.setdefault(section, {})[field_name] = value
        else:
            top[name] = value
    for section, changes in sections.items():
        top[section] = dataclasses.replace(getattr(preset, section), **changes)
    return dataclasses.replace(preset, **top)


def flat_settings(config: Preset | Mapping[str, Any]) -> dict[str, Any]:
    """A preset (or its `to_dict()`, e.g. read from a run's config.json) as {"section.field": value},
    with "name" too; lists become tuples."""
    d = config.to_dict() if isinstance(config, Preset) else config
    out: dict[str, Any] = {}
    for k, v in d.items():
        items = [(f"{k}.{g}", w) for g, w in v.items()] if isinstance(v, Mapping) else [(k, v)]
        out.update((name, tuple(w) if isinstance(w, list) else w) for name, w in items)
    return out


def preset_from_dict(d: Mapping[str, Any]) -> Preset:
    """The preset a `to_dict()` describes (a run's config.json). Fields it lacks (the run is older than
    they are) take their dataclass defaults, the behaviour before they existed; fields it has that no
    longer exist are dropped."""
    known = setting_types()
    flat = flat_settings(d)
    return with_settings(Preset(name=flat.get("name", "")), {k: v for k, v in flat.items() if k in known})


def changed_settings(before: Preset, after: Preset, growable: Iterable[str] = ()) -> list[str]:
    """"name: old -> new" for every setting (and the preset's name) that differs between `before` and
    `after`, except the `growable` ones (e.g. "iterations", "recipe") when they only grew: a number
    became larger, a tuple got more items after the same ones."""
    old, new = flat_settings(before), flat_settings(after)
    grows = set(growable)

    def grew(a, b) -> bool:
        return b[:len(a)] == a if isinstance(a, tuple) else b > a

    return [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items()
            if old[k] != v and not (k in grows and grew(old[k], v))]
