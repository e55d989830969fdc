"""Presets: every size of every stage, as frozen dataclasses.

`smoke` makes each notebook finish in about a minute on 2 CPU cores (the tests set it),
`quick` is sized for a laptop CPU (about an hour end to end), `full` is paper scale for a GPU.
`WM_PRESET` selects one; `get_preset()` reads it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

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
        raise ValueError(f"{what}: env seeds {first}..{first + count - 1} are not all in the {use} range "
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
            raise ValueError(f"collect.episodes has {len(self.episodes)} entries for {len(self.policies)} policies")
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
    epochs: int = 20
    val_episodes: int = 2
    seed: int = 0


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
    optimizer: str = "pycma"     # or "evosax"
    real_every: int = 10         # score the best on real episodes every K generations (0: never)
    real_episodes: int = 4
    select_candidates: int = 0   # after evolving: the CMA mean and the best candidates of the last
    select_episodes: int = 16    # generations, each on `select_episodes` selection-range real tracks
    real_seed: int = SELECTION_SEED  # env seeds of every real episode that evolution uses
    frame_budget: int = 0        # real-environment fitness: stop once this many real frames are used (0: none)
    seed: int = 0


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    # the shipped dream-trained agent (`wm pipeline --preset results`, data/pretrained)
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
    ),
}


def get_preset(name: str | None = None) -> Preset:
    """The preset called `name`, else the one named by `WM_PRESET`, else `quick`."""
    source = "argument" if name else "WM_PRESET"
    name = name or os.environ.get("WM_PRESET") or "quick"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (from {source}); valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
