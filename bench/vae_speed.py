"""V training throughput: frames per second of the full training step (forward, backward, Adam).

Times `wmlib.vae.make_train_step` on a batch of random uint8 frames (paper batch 100) and, when
PyTorch is importable, the same model in PyTorch: the paper's ConvVAE with the same layers, the same
loss (sum of squared errors + KL clipped below at 0.5 * z_dim, batch mean), Adam 1e-4, started from
the same weights (copied from the JAX model; the script checks that both compute the same encoder
and decoder outputs). PyTorch runs in its own process, as its users run it: the JAX side keeps
freed memory for reuse as the `wm` command does (`wmlib.fast.memory.reuse_freed_memory`), which
would speed PyTorch up too; `--torch-same-allocator` gives the PyTorch process the same setting,
to see how much. Each uses as many threads as the process has cores (`taskset -c 0 ...` compares
one core each). Compilation and warm-up steps are excluded. The two are timed in alternating rounds
of `--steps` steps (the first of each round in alternating order), so a busy neighbour slows both;
the headline is the best round of each (closest to an idle machine), the medians are printed too.

    uv run python bench/vae_speed.py
    PYTHONPATH=/tmp/torchlib uv run python bench/vae_speed.py    # torch installed outside the project:
                                   # python3 -m pip install --target /tmp/torchlib torch==2.13.0

Last line: JSON {"jax_frames_per_s": ..., "torch_frames_per_s": ... or null, "ratio": ... or null}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time

import numpy as np

# Nothing at module level imports wmlib or JAX: the PyTorch process re-imports this module.


def jax_runner(vae, frames: np.ndarray):
    """A closure that runs one JAX training step on `frames` and waits for it."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from wmlib.vae import make_optimizer, make_train_step

    optimizer = make_optimizer(1e-4)
    state = [vae, optimizer.init(eqx.filter(vae, eqx.is_inexact_array))]
    step, batch = make_train_step(optimizer), jnp.asarray(frames)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100_000))

    def run() -> float:
        state[0], state[1], loss, _ = step(state[0], state[1], batch, next(keys))
        return float(loss)

    return run


def torch_runner(weights: dict, frames: np.ndarray, reference: dict):
    """The same model, loss and optimiser in PyTorch (NCHW inside) from the JAX model's `weights`
    (numpy), and the largest differences from the JAX encoder means and decoder outputs in
    `reference`; returns (run, differences)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    enc = [(t(w).permute(3, 2, 0, 1).contiguous(), t(b)) for w, b in weights["encoder"]]  # HWIO -> OIHW
    dec = [(t(w).permute(0, 3, 1, 2).contiguous(), t(b)) for w, b in weights["decoder"]]  # (I,k,k,O) -> IOHW
    dense = [(t(w).T.contiguous(), t(b)) for w, b in weights["dense"]]  # mu, logvar, decoder_in
    params = [p.requires_grad_() for pair in enc + dec + dense for p in pair]
    z_dim = dense[0][0].shape[0]

    def encode(x):
        h = x
        for w, b in enc:
            h = F.relu(F.conv2d(h, w, b, stride=2))
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # flatten in (h, w, c) order, as the JAX model
        return F.linear(h, *dense[0]), F.linear(h, *dense[1])

    def decode(z):
        h = F.linear(z, *dense[2]).reshape(-1, 1024, 1, 1)
        for i, (w, b) in enumerate(dec):
            h = F.conv_transpose2d(h, w, b, stride=2)
            h = F.relu(h) if i < len(dec) - 1 else torch.sigmoid(h)
        return h

    def forward(x):
        mu, logvar = encode(x)
        return decode(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)), mu, logvar

    optimizer = torch.optim.Adam(params, lr=1e-4)
    batch = torch.from_numpy(frames)

    def run() -> float:
        x = batch.permute(0, 3, 1, 2).float() / 255.0
        recon, mu, logvar = forward(x)
        recon_loss = torch.sum((recon - x) ** 2, dim=(1, 2, 3))
        kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - torch.exp(logvar), dim=1)
        loss = torch.mean(recon_loss + torch.clamp(kl, min=0.5 * z_dim))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    with torch.no_grad():  # the same function: encoder means, and decoder outputs of those means
        mu = encode(batch[:8].permute(0, 3, 1, 2).float() / 255.0)[0]
        recon = decode(mu)
    return run, (float(np.abs(reference["mu"] - mu.numpy()).max()),
                 float(np.abs(reference["recon"] - recon.numpy()).max()))


def torch_process(conn, weights: dict, frames: np.ndarray, reference: dict, same_allocator: bool) -> None:
    """The PyTorch side, in its own process: answers "run N steps" with the seconds they took."""
    if same_allocator:
        from wmlib.fast.memory import reuse_freed_memory

        reuse_freed_memory()
    try:
        run, diffs = torch_runner(weights, frames, reference)
    except ImportError:
        conn.send(None)
        return
    conn.send(diffs)
    while (steps := conn.recv()) is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            run()
        conn.send((time.perf_counter() - t0, time.process_time() - c0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--no-torch", action="store_true", help="time the JAX step only")
    parser.add_argument("--torch-same-allocator", action="store_true",
                        help="give the PyTorch process wmlib's allocator setting too")
    args = parser.parse_args()

    from wmlib.fast.memory import reuse_freed_memory

    reuse_freed_memory()  # as `wm train-vae` runs, before JAX starts its threads

    import jax
    import jax.numpy as jnp

    from wmlib.vae import ConvVAE

    frames = np.random.default_rng(0).integers(0, 256, (args.batch, 64, 64, 3), dtype=np.uint8)
    vae = ConvVAE(jax.random.PRNGKey(0))
    runners = {"jax": jax_runner(vae, frames)}
    child = None
    if not args.no_torch:
        mu = vae.encode(jnp.asarray(frames[:8], jnp.float32) / 255.0)[0]
        reference = {"mu": np.asarray(mu), "recon": np.asarray(vae.decode(mu)).transpose(0, 3, 1, 2)}
        weights = {"encoder": [(np.asarray(c.weight), np.asarray(c.bias)) for c in vae.encoder],
                   "decoder": [(np.asarray(c.weight), np.asarray(c.bias)) for c in vae.decoder],
                   "dense": [(np.asarray(d.weight), np.asarray(d.bias)) for d in (vae.mu, vae.logvar, vae.decoder_in)]}
        conn, child_conn = multiprocessing.get_context("spawn").Pipe()
        child = multiprocessing.get_context("spawn").Process(
            target=torch_process, args=(child_conn, weights, frames, reference, args.torch_same_allocator))
        child.start()
        diffs = conn.recv()
        if diffs is None:
            child.join()
            child = None
        else:
            print(f"same weights, same function: max |mu_jax - mu_torch| = {diffs[0]:.1e}, "
                  f"max |decode_jax - decode_torch| = {diffs[1]:.1e}", flush=True)

            def torch_steps(steps: int) -> tuple[float, float]:
                conn.send(steps)
                return conn.recv()

            runners["torch"] = torch_steps
    cores = len(os.sched_getaffinity(0))
    print(f"{jax.devices()[0]}, {cores} cores; batch {args.batch}; {', '.join(runners)}"
          + (" (PyTorch with wmlib's allocator setting)" if child and args.torch_same_allocator else ""), flush=True)

    def timed(name: str, steps: int) -> tuple[float, float]:
        if name == "torch":
            return runners["torch"](steps)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            runners["jax"]()
        return time.perf_counter() - t0, time.process_time() - c0

    for name in runners:
        print(f"{name}: compile/warm-up {timed(name, 3)[0]:.1f} s", flush=True)
    per_step = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for r in range(args.rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            wall, cpu_s = timed(name, args.steps)
            per_step[name].append(wall / args.steps)
            cpu[name].append(cpu_s / args.steps)
    if child:
        conn.send(None)
        child.join()
    fps = {}
    for name in runners:
        best, med = min(per_step[name]), statistics.median(per_step[name])
        fps[name] = args.batch / best
        print(f"{name:6s} best {args.batch / best:7.1f} frames/s ({best * 1e3:6.1f} ms/step), "
              f"median {args.batch / med:7.1f} frames/s, CPU {statistics.median(cpu[name]) * 1e3:6.0f} ms/step",
              flush=True)
    torch_fps = fps.get("torch")
    if torch_fps:
        print(f"ratio jax / torch: {fps['jax'] / torch_fps:.2f} (best rounds), "
              f"{statistics.median(per_step['torch']) / statistics.median(per_step['jax']):.2f} (medians)")
    print(json.dumps({"jax_frames_per_s": round(fps["jax"], 1),
                      "torch_frames_per_s": round(torch_fps, 1) if torch_fps else None,
                      "ratio": round(fps["jax"] / torch_fps, 3) if torch_fps else None,
                      "jax_median_frames_per_s": round(args.batch / statistics.median(per_step["jax"]), 1),
                      "torch_median_frames_per_s": (round(args.batch / statistics.median(per_step["torch"]), 1)
                                                    if torch_fps else None),
                      "torch_same_allocator": bool(child and args.torch_same_allocator),
                      "batch": args.batch, "device": str(jax.devices()[0])}))


if __name__ == "__main__":
    main()
