"""The one training loop, shared by V and M.

`fit` runs jitted optax steps over batches given by index, shows a tqdm bar with the loss, logs
metrics to `metrics.jsonl`, evaluates on held-out data, checkpoints, resumes, and stops on a NaN.

Files in the run folder, for a stage called NAME:
  NAME.eqx        the model (checkpoint with JSON header), what later stages load
  NAME.train.eqx  model + optimiser state + step, what a resumed run continues from
  metrics.jsonl   one JSON record per log line: {"stage": NAME, "step": ..., "loss": ..., ...}
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from wmlib import checkpoint
from wmlib.errors import WMError
from wmlib.files import append_jsonl, atomic_write, read_jsonl
from wmlib.paths import METRICS


ModelT = TypeVar("ModelT", bound=eqx.Module)


class TrainingDiverged(WMError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """One jitted optimisation step: `step(model, opt_state, batch, key) -> (model, opt_state, loss, aux)`.

    `loss_fn(model, batch, key) -> (loss, aux)` where aux is a dict of scalars to log.
    """

    @eqx.filter_jit
    def step(model, opt_state, batch, key):
        (loss, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss, aux

    return step


def _train_state_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.train.eqx"


def fit(model: ModelT, optimizer: optax.GradientTransformation, loss_fn: Callable,
        batch_fn: Callable[[int], Any], steps: int, run_dir: str | os.PathLike, *, name: str, hyper: dict,
        kind: str | None = None, seed: int = 0, evaluate: Callable[[ModelT], dict] | None = None,
        eval_every: int = 500, log_every: int = 10, extra: dict | None = None, progress: bool = True,
        step_fn: Callable | None = None) -> ModelT:
    """Train `model` for `steps` steps (resuming from `run_dir` if a previous run stopped early).

    `name` names the stage: its files (NAME.eqx, NAME.train.eqx), its metrics records and, unless
    `kind` says otherwise, the checkpoint kind; `hyper` is the header that rebuilds the model.
    `batch_fn(i)` returns batch number i (so a resumed run sees the same batches); `step_fn`, when a
    model brings its own jitted step (same signature as `make_step`'s), replaces the generic one built
    from `loss_fn` and `optimizer` (which still initialises the optimiser state); `evaluate(model)`
    returns validation metrics, logged every `eval_every` steps and at the end, when the model and
    training state are checkpointed too. The loss stays on the device between log lines: every
    `log_every` steps (and before each checkpoint) the losses since the last look are fetched at once,
    checked for NaN and shown, so the host does not wait for the device every step. Returns the
    trained model.
    """
    kind = name if kind is None else kind
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, state_path = run_dir / METRICS, _train_state_path(run_dir, name)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    start = 0
    if state_path.exists():
        (model, opt_state, start_arr), _ = checkpoint.load(
            state_path, f"{kind}-train-state", lambda h: (model, opt_state, jnp.zeros((), jnp.int32)))
        start = int(start_arr)
        kept = [r for r in read_jsonl(metrics_path) if r.get("stage") != name or r.get("step", 0) <= start]
        with atomic_write(metrics_path, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    step_fn = step_fn or make_step(loss_fn, optimizer)
    base_key = jax.random.PRNGKey(seed)

    def save(at: int) -> None:
        meta = {"step": at, **(extra or {})}
        checkpoint.save(run_dir / f"{name}.eqx", model, kind, hyper, meta)
        checkpoint.save(state_path, (model, opt_state, jnp.asarray(at, jnp.int32)), f"{kind}-train-state", hyper, meta)

    def log_eval(at: int) -> None:
        if evaluate is not None:
            append_jsonl(metrics_path, {"stage": name, "step": at, **{f"val_{k}": float(v)
                                                                       for k, v in evaluate(model).items()}})

    bar = tqdm(total=steps, initial=start, desc=f"train {name}", unit="step", disable=not progress)
    t0 = time.perf_counter()
    last_good = start
    pending: list = []  # the losses (device scalars) of the steps since the host last looked
    try:
        for i in range(start, steps):
            model, opt_state, loss, aux = step_fn(model, opt_state, batch_fn(i), jax.random.fold_in(base_key, i))
            pending.append(loss)
            bar.update()
            done = i + 1
            log, checkpoint_now = done % log_every == 0 or done == steps, done % eval_every == 0 or done == steps
            if not (log or checkpoint_now):
                continue
            losses = [float(x) for x in jax.device_get(pending)]  # one wait for the device per log line
            first = done - len(losses)
            pending = []
            for j, value in enumerate(losses):
                if not math.isfinite(value):
                    kept_file = (f"the last good checkpoint {run_dir / (name + '.eqx')} (step {last_good}) is kept"
                                 if last_good else "no checkpoint was written yet")
                    raise TrainingDiverged(f"{name}: loss became {value} at step {first + j}; stopped, {kept_file}. "
                                           "Try a lower learning rate.")
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if log:
                append_jsonl(metrics_path, {"stage": name, "step": done, "loss": losses[-1],
                                            "elapsed_s": time.perf_counter() - t0,
                                            **{k: float(v) for k, v in aux.items()}})
            if checkpoint_now:
                log_eval(done)
                save(done)
                last_good = done
    finally:
        bar.close()
    return model
