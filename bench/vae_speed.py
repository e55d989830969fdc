"""V training throughput: frames per second of the full training step (forward, backward, Adam).

Times `wmlib.vae.make_train_step` on a batch of random uint8 frames (paper batch 100) and, when
PyTorch is importable, the same model in PyTorch in the same process: the paper's ConvVAE with the
same layers, the same loss (sum of squared errors + KL clipped below at 0.5 * z_dim, batch mean),
Adam 1e-4, started from the same weights (copied from the JAX model; the script checks that both
compute the same encoder and decoder outputs). PyTorch uses as many threads as the process has
cores (`taskset -c 0 ...` compares one core each); XLA uses them all by default. Compilation and
warm-up steps are excluded. The two are timed in alternating rounds of `--steps` steps (the first
of each round in alternating order), so a busy neighbour slows both; the headline is the best round
of each (closest to an idle machine), the medians are printed too.

    uv run python bench/vae_speed.py
    PYTHONPATH=/tmp/torchlib uv run python bench/vae_speed.py    # torch installed outside the project:
                                   # python3 -m pip install --target /tmp/torchlib torch==2.13.0

Last line: JSON {"jax_frames_per_s": ..., "torch_frames_per_s": ... or null, "ratio": ... or null}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from wmlib.vae import ConvVAE, make_optimizer, make_train_step


def jax_runner(vae: ConvVAE, frames: np.ndarray):
    """A closure that runs one JAX training step on `frames` and waits for it."""
    optimizer = make_optimizer(1e-4)
    state = [vae, optimizer.init(eqx.filter(vae, eqx.is_inexact_array))]
    step, batch = make_train_step(optimizer), jnp.asarray(frames)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100_000))

    def run() -> float:
        state[0], state[1], loss, _ = step(state[0], state[1], batch, next(keys))
        return float(loss)

    return run


def torch_runner(vae: ConvVAE, frames: np.ndarray):
    """The same model, loss and optimiser in PyTorch (NCHW inside, weights copied from `vae`), or
    None when torch is not importable."""
    try:
        import torch
    except ImportError:
        return None
    import torch.nn.functional as F

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    enc = [(t(c.weight).permute(3, 2, 0, 1).contiguous(), t(c.bias)) for c in vae.encoder]  # HWIO -> OIHW
    dec = [(t(c.weight).permute(0, 3, 1, 2).contiguous(), t(c.bias)) for c in vae.decoder]  # (I,k,k,O) -> IOHW
    dense = [(t(d.weight).T.contiguous(), t(d.bias)) for d in (vae.mu, vae.logvar, vae.decoder_in)]
    params = [p.requires_grad_() for pair in enc + dec + dense for p in pair]
    z_dim = vae.z_dim

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
        mu_torch = encode(batch[:8].permute(0, 3, 1, 2).float() / 255.0)[0]
        h = decode(mu_torch)
    mu_jax = vae.encode(jnp.asarray(frames[:8], jnp.float32) / 255.0)[0]
    recon_jax = np.asarray(vae.decode(mu_jax)).transpose(0, 3, 1, 2)
    print(f"same weights, same function: max |mu_jax - mu_torch| = {np.abs(mu_jax - mu_torch.numpy()).max():.1e}, "
          f"max |decode_jax - decode_torch| = {np.abs(recon_jax - h.numpy()).max():.1e}", flush=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--no-torch", action="store_true", help="time the JAX step only")
    args = parser.parse_args()

    frames = np.random.default_rng(0).integers(0, 256, (args.batch, 64, 64, 3), dtype=np.uint8)
    vae = ConvVAE(jax.random.PRNGKey(0))
    runners = {"jax": jax_runner(vae, frames)}
    if not args.no_torch and (torch_run := torch_runner(vae, frames)) is not None:
        runners["torch"] = torch_run
    cores = len(os.sched_getaffinity(0))
    print(f"{jax.devices()[0]}, {cores} cores; batch {args.batch}; {', '.join(runners)}", flush=True)
    for name, run in runners.items():
        t0 = time.perf_counter()
        for _ in range(3):
            run()
        print(f"{name}: compile/warm-up {time.perf_counter() - t0:.1f} s", flush=True)

    per_step = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for r in range(args.rounds):
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                runners[name]()
            per_step[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
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
                      "batch": args.batch, "device": str(jax.devices()[0])}))


if __name__ == "__main__":
    main()
