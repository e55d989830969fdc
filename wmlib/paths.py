"""Where a run keeps what it writes: every file name of a run, in one place.

A pipeline run (`wm pipeline`) lays its folder out like this, and `data/pretrained` (the shipped
agent, written by `wm export`) is a run without data/ and iterations:

    RUN/
      config.json          the preset the run started with (every setting)
      stages.json          the stages done and their wall times; a re-run skips them
      summary.txt          the summary table
      eval.json            the agent's real score on test-range tracks
      data/                real episodes (and their encodings)
      vae/                 V: vae.eqx, metrics.jsonl
      mdnrnn/              M: mdnrnn.eqx, metrics.jsonl
      evolve/              C's evolution: metrics.jsonl, controller.eqx (best in the dream),
                           selected.eqx and selection.json (chosen on real tracks), fidelity/
      agent/               V, M and C together: vae.eqx, mdnrnn.eqx, controller.eqx (`PARTS`)
      iter_K/              sim2real iteration K: mdnrnn/, evolve/, agent/ and eval.json, named as above

`RunPaths(RUN)` names each of them; `RunPaths(RUN).iteration(K)` names iteration K's the same way, and
`final()` is the last stage with an evaluated agent (the run itself, or its last iteration). `SHIPPED`
is data/pretrained's; a lesson loads its own run's files when it made them and the shipped ones
otherwise (`find_artifact`), so any lesson can start on its own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from wmlib.config import PRETRAINED_DIR

PARTS = {"V": "vae.eqx", "M": "mdnrnn.eqx", "C": "controller.eqx"}  # an agent folder's files (`wmlib.agent`)
METRICS = "metrics.jsonl"  # each stage's log, one JSON record per line (`train.fit`, `evolve.evolve`)
FIDELITY = "fidelity.json"  # `wm fidelity`'s report
_ITERATION = re.compile(r"iter_(\d+)")


@dataclass(frozen=True)
class RunPaths:
    """The files and folders of the run (or of one of its iterations) in `root`."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    # the run's own files
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.txt"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    # V
    @property
    def vae_dir(self) -> Path:
        return self.root / "vae"

    @property
    def vae(self) -> Path:
        return self.vae_dir / PARTS["V"]

    @property
    def vae_metrics(self) -> Path:
        return self.vae_dir / METRICS

    # M
    @property
    def mdnrnn_dir(self) -> Path:
        return self.root / "mdnrnn"

    @property
    def mdnrnn(self) -> Path:
        return self.mdnrnn_dir / PARTS["M"]

    @property
    def mdnrnn_metrics(self) -> Path:
        return self.mdnrnn_dir / METRICS

    # C's evolution
    @property
    def evolve_dir(self) -> Path:
        return self.root / "evolve"

    @property
    def evolve_metrics(self) -> Path:
        return self.evolve_dir / METRICS

    @property
    def dream_best(self) -> Path:
        """The controller with the best dream return so far."""
        return self.evolve_dir / PARTS["C"]

    @property
    def selected(self) -> Path:
        """The controller chosen by real episodes on selection-range tracks (`pipeline.select_controller`)."""
        return self.evolve_dir / "selected.eqx"

    @property
    def selection(self) -> Path:
        """Every candidate's real scores from that choice."""
        return self.evolve_dir / "selection.json"

    # the agent
    @property
    def agent_dir(self) -> Path:
        return self.root / "agent"

    def agent_part(self, part: str) -> Path:
        """The agent's file of part "V", "M" or "C"."""
        return self.agent_dir / PARTS[part]

    # iterations
    def iteration(self, k: int) -> RunPaths:
        """Sim2real iteration k (1, 2, ...): its mdnrnn/, evolve/, agent/ and eval.json."""
        return RunPaths(self.root / f"iter_{k}")

    def iterations(self) -> list[RunPaths]:
        """The iterations that exist, in order."""
        found = [(int(m[1]), p) for p in self.root.glob("iter_*") if (m := _ITERATION.fullmatch(p.name))]
        return [RunPaths(p) for _, p in sorted(found)]

    def final(self) -> RunPaths:
        """The last stage with an evaluated agent: the last iteration with an eval.json, else the run."""
        done = [it for it in self.iterations() if it.eval.exists()]
        return done[-1] if done else self


SHIPPED = RunPaths(PRETRAINED_DIR)  # the shipped agent and its logs, laid out as a run


def find_artifact(*candidates: Path) -> Path:
    """The first of `candidates` that exists, e.g. `find_artifact(run.vae, SHIPPED.vae)`: a lesson's own
    output when it has been made, else the shipped one."""
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"none of {', '.join(map(str, candidates))} exists; run the earlier stage (or its "
                            "notebook) first")


def fidelity_dir(evolution: str | os.PathLike) -> Path:
    """The folder of `wm fidelity`'s report on an evolution folder (its default --out)."""
    return Path(evolution) / "fidelity"
