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


def runs_dir() -> Path:
    """Where runs are written: `WM_RUNS`, else `runs/` at the project root (gitignored)."""
    return Path(os.environ.get("WM_RUNS", PROJECT_ROOT / "runs"))


@dataclass(frozen=True)
class CollectConfig:
    """Real-environment data collection (paper: 10,000 random-policy rollouts)."""
    policies: tuple[str, ...] = ("brownian", "recovery", "heuristic", "random")
    episodes_per_policy: int = 12
    max_steps: int = 1000
    seed: int = 0
    mirror: bool = True


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
    optimizer: str = "pycma"     # or "evosax"
    real_every: int = 10         # score the best on real episodes every K generations (0: never)
    real_episodes: int = 4
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
        collect=CollectConfig(policies=("brownian", "recovery"), episodes_per_policy=2, max_steps=60),
        vae=VAEConfig(batch_size=16, steps=20, val_episodes=1, val_frames=32, eval_every=10),
        rnn=RNNConfig(seq_len=16, batch_size=4, epochs=2, val_episodes=1),
        evolve=EvolveConfig(popsize=8, repeats=2, generations=2, episode_len=50, real_every=0,
                            real_episodes=1),
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
}


def get_preset(name: str | None = None) -> Preset:
    """The preset called `name`, else the one named by `WM_PRESET`, else `quick`."""
    source = "argument" if name else "WM_PRESET"
    name = name or os.environ.get("WM_PRESET") or "quick"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (from {source}); valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
