"""Dream fidelity, measured: does M's dream rank controllers as reality does, does its road bend as
often as the real one, and is its reward calibrated? (DESIGN.md: dream scores describe the dream.)

Four measurements, each a plain function on arrays, and `fidelity_report` that runs them on a run's
files and writes `fidelity.json` and four figures:

1. Rank agreement. CMA-ES keeps a controller because the dream scores it high; that helps only if the
   dream orders controllers as reality does. Controllers spread over an evolution run (its search
   means every few generations) are scored in the dream at several horizons and on the same real
   selection-range tracks; `spearman` compares the two orders (1: the same order, 0: unrelated).
2. Road shape. `bend_amount` finds the road ahead of the car in a 64x64 frame and measures how much it
   curves; a frame shows a bend when that exceeds `BEND_PIXELS`. Checked against the track geometry
   (`road_turn_ahead`, `bend_agreement`), then counted in real frames, V's reconstructions of them,
   and V's decodings of a dream: a dream whose roads are straighter than reality's trains a
   controller that never learns to steer.
3. Reward calibration. M watching a real episode predicts each step's reward; summed over the episode
   that should match the real return, per driver (`reward_calibration`).
4. Steering response. Does the dream answer the wheel? A linear read-out of V's latent that predicts
   the heuristic driver's steering (`road_readout`) says where the road goes as V sees it. After the
   recovery driver's sudden jerks of the wheel (`jerk_events`, steering independent of the frame)
   that read-out moves in reality; `steering_response` dreams the same steps from M's state at the
   jerk, once with the real actions and once with the wheel held straight: a dream in which the two
   barely differ ignores steering, and a controller evolved in it cannot learn to steer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from collections.abc import Callable, Sequence

import cv2
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from wmlib.config import SELECTION_SEED, EvolveConfig, check_seeds
from wmlib.controller import Controller, from_flat, n_params
from wmlib.data import STEERING_PROBES, Episode, steering_probes
from wmlib.dream import DreamParams, drive, rollout_trajectory, start_from_frame
from wmlib.errors import WMError

HORIZONS = (50, 100, 200, 1000)  # dream steps a controller is scored over
ZOOM_STEPS = 50  # a real episode's first second zooms in from far above: no road shape to read there

# The 64x64 frame (after the zoom-in): the car's nose is at row ~50, its body at rows ~50-56 and
# columns ~29-34; the road it is on is ~14 pixels wide, and rows 6..46 show it ~4 to ~32 world units
# ahead (one row is ~0.68 world units).
AHEAD_ROWS = (6, 46)      # first and last row of the band ahead of the car that is measured
CAR_COLS = (28, 36)       # columns just ahead of the car where its road is looked for
MIN_ROAD_ROWS = 8         # fewer rows of the car's road than this: the road ahead is not seen
BEND_PIXELS = 3.0         # the road's centre departs from a straight line by this much: a bend

# The geometry's answer (`road_turn_ahead`): the track's heading turns by more than BEND_TURN between
# TURN_NEAR and TURN_FAR world units ahead of the car (the stretch the band above shows).
TURN_NEAR, TURN_FAR = 3.5, 31.5
BEND_TURN = math.radians(15.0)
TRACK_FOLLOWERS = ("heuristic", "recovery")  # drivers that go round the track in its index order


# ---- rank agreement --------------------------------------------------------------------------------

def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x` (n,), tied values sharing the mean of their ranks (as scipy's rankdata)."""
    x = np.asarray(x, np.float64)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, group, count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / count)[group]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two (n,) arrays: Pearson's correlation of their average ranks.
    NaN when either is constant (no order to compare), as scipy.stats.spearmanr."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman needs two arrays of the same length >= 2, got {len(a)} and {len(b)}")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = math.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / norm) if norm > 0 else float("nan")


def pick_controllers(means: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` generations spread evenly over an evolution's search means (G, n), the
    first and the last included (all G when G <= count): controllers from poor to evolved."""
    if count < 2 or len(means) < 2:
        raise WMError(f"comparing orders needs at least 2 controllers: asked for {count} from an evolution "
                      f"history of {len(means)} generations")
    return np.unique(np.linspace(0, len(means) - 1, min(count, len(means))).round().astype(int))


@eqx.filter_jit
def _returns_at(key: jax.Array, vec: Float[Array, " n"], params: DreamParams, rollouts: int,
                horizons: tuple[int, ...]) -> Float[Array, " H"]:
    m = params.mdnrnn
    controller = from_flat(vec, m.z_dim, m.hidden)

    def one(k):
        _, traj = rollout_trajectory(k, controller, params, max(horizons))
        return jnp.cumsum(traj.reward)[jnp.asarray(horizons) - 1]

    return jax.vmap(one)(jax.random.split(key, rollouts)).mean(axis=0)


def dream_scores(params: DreamParams, flat: np.ndarray, horizons: Sequence[int] = HORIZONS,
                 rollouts: int = 64, seed: int = 0, progress: bool = True) -> np.ndarray:
    """Mean dream return of K controllers (flat vectors (K, n)) over `rollouts` dreams -> (K, H).

    Each dream runs max(horizons) steps and its return is read after every horizon's step count: the
    first h steps of a long dream are a dream of h steps (so `params.max_steps` >= max(horizons)).
    Every controller meets the same dreams (keys from `seed`: common random numbers).
    """
    horizons = tuple(int(h) for h in horizons)
    if params.max_steps < max(horizons):
        raise WMError(f"dreams of {params.max_steps} steps cannot be scored at horizon {max(horizons)}")
    key = jax.random.PRNGKey(seed)
    rows = [np.asarray(_returns_at(key, jnp.asarray(vec, jnp.float32), params, rollouts, horizons))
            for vec in tqdm(np.asarray(flat), desc="dream scores", unit="C", disable=not progress)]
    return np.stack(rows)


def reference_return(params: DreamParams, rollouts: int = 256, seed: int = 0) -> float:
    """What the dream pays the reference controller over its whole length (`params.max_steps` steps, mean of
    `rollouts` dreams): zero weights, so straight ahead at half gas whatever it sees. Reality pays it little
    (it leaves the road at the first bend: -45.5 +- 24.4 over its first 400 steps on 16 selection tracks,
    docs/results.md); a dream that pays it much more keeps the road under a car that does not steer, and
    C's evolved there learn to exploit that rather than to drive."""
    m = params.mdnrnn
    zero = np.zeros((1, n_params(m.z_dim, m.hidden)), np.float32)
    return float(dream_scores(params, zero, (params.max_steps,), rollouts, seed, progress=False)[0, 0])


def real_scorer(agent_dir: str | os.PathLike, episodes: int, seed: int = SELECTION_SEED,
                workers: int | None = None, fast: bool = True) -> Callable[[np.ndarray, Path | None], np.ndarray]:
    """`score(vec, save_dir) -> (episodes,)` real returns of the controller `vec` with the agent's V and M,
    on env seeds seed..seed+episodes-1 (the selection range: these episodes help judge the dream);
    the episodes are saved in `save_dir` when it is given."""
    from wmlib.evaluate import evaluate

    check_seeds("selection", seed, episodes, "fidelity real episodes")

    def score(vec: np.ndarray, save_dir: Path | None = None) -> np.ndarray:
        r = evaluate(agent_dir, episodes, seed=seed, workers=workers, fast=fast, controller_params=vec,
                     save_dir=save_dir, progress=False)
        if r["failed"]:
            raise RuntimeError(f"real episodes of a controller failed: {r['failed']}")
        return np.asarray(r["scores"])

    return score


def rank_agreement(dream: DreamParams, means: np.ndarray, real_score: Callable[[np.ndarray, Path | None], np.ndarray],
                   controllers: int = 20, horizons: Sequence[int] = HORIZONS, rollouts: int = 64, seed: int = 0,
                   save_final: Path | None = None, progress: bool = True) -> dict:
    """Do the dream and reality rank controllers alike?

    `means` (G, n): an evolution run's search means (`evolve.history(run)["mean"]`); `controllers`
    of them spread over the run are scored in `dream` (`dream_scores`) and by
    `real_score(vec, save_dir) -> (E,)` real returns (`real_scorer`; the last, most evolved controller
    saves its episodes in `save_final`). Returns per controller its generation, dream means (K, H),
    real returns (K, E), and per horizon the Spearman correlation of dream and real means.
    """
    picks = pick_controllers(np.asarray(means), controllers)
    flat = np.asarray(means)[picks]
    dream_mean = dream_scores(dream, flat, horizons, rollouts, seed, progress)
    real = np.stack([np.asarray(real_score(vec, save_final if i == len(flat) - 1 else None), np.float64)
                     for i, vec in enumerate(tqdm(flat, desc="real scores", unit="C", disable=not progress))])
    return {"generations": (picks + 1).tolist(), "horizons": [int(h) for h in horizons],
            "dream": dream_mean.tolist(), "real": real.tolist(), "real_mean": real.mean(axis=1).tolist(),
            "spearman": {str(h): spearman(dream_mean[:, j], real.mean(axis=1)) for j, h in enumerate(horizons)}}


# ---- road shape ------------------------------------------------------------------------------------

def road_mask(frames: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) uint8 -> (N, 64, 64) bool: grey road pixels.

    The road is ~(102, 102, 102), grass (102, 204, 102) / (102, 230, 102), curbs red and white, the car
    red and black. Grey means the channels nearly agree and the pixel is neither dark nor white; the
    tolerance of 40 keeps V's blurred road (with a tint of purple or green) and drops the blend of
    road and grass at its edges, whose green channel stands out by ~50 or more.
    """
    f = np.asarray(frames).astype(np.int16)
    spread = f.max(axis=-1) - f.min(axis=-1)
    level = f.mean(axis=-1)
    return (spread < 40) & (level > 60) & (level < 170)


def road_centres(frames: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) uint8 -> (N, R) road centre column per row of AHEAD_ROWS (far row first), NaN
    where the car's road is not in that row.

    The car's road is the connected patch of road pixels (above the car) that reaches the columns
    just ahead of it, so another stretch of track in view does not count. A row's centre is the mean
    column of that patch in the row: where the road turns across the frame, the centre slides with it.
    """
    first, last = AHEAD_ROWS
    masks = road_mask(frames)[:, :last + 1].astype(np.uint8)
    columns = np.arange(masks.shape[2])
    out = np.full((len(masks), last - first + 1), np.nan)
    for i, mask in enumerate(masks):
        _, label = cv2.connectedComponents(mask, connectivity=4)
        seeds = label[last - 2:, CAR_COLS[0]:CAR_COLS[1]]
        seeds = seeds[seeds > 0]
        if not len(seeds):
            continue  # no road just ahead of the car (off the road, or no road in the picture)
        road = (label == np.bincount(seeds).argmax())[first:]
        count = road.sum(axis=1)
        out[i] = np.where(count >= 2, (road * columns).sum(axis=1) / np.maximum(count, 1), np.nan)
    return out


def bend_amount(centres: np.ndarray) -> np.ndarray:
    """(N, R) centres (`road_centres`) -> (N,) how far, in pixels, the road ahead bends away from a
    straight line; NaN where fewer than MIN_ROAD_ROWS rows see the road.

    A parabola x(d) = a + b d + c d^2 is fitted to the centre column x against the rows d ahead of
    AHEAD_ROWS[1] (least squares, one batched 3x3 solve); |c| D^2, with D the band's height, is the
    sideways departure from the road's tangent line at the far end. A straight road seen at an angle
    (the car not aligned with it) has c = 0: only curvature counts, not the car's heading.
    """
    n = centres.shape[1]
    d = np.arange(n)[::-1].astype(np.float64)  # rows ahead of the last row: far row first
    ok = ~np.isnan(centres)
    x = np.where(ok, centres, 0.0)
    basis = np.stack([np.ones(n), d, d * d], axis=1)  # (R, 3)
    gram = np.einsum("nr,ri,rj->nij", ok.astype(np.float64), basis, basis)
    rhs = np.einsum("nr,ri->ni", x, basis)
    seen = ok.sum(axis=1) >= MIN_ROAD_ROWS
    gram[~seen] = np.eye(3)  # keeps the solve well posed; those frames give NaN below
    c = np.linalg.solve(gram, rhs[..., None])[:, 2, 0]
    return np.where(seen, np.abs(c) * (n - 1) ** 2, np.nan)


def bends(frames: np.ndarray, threshold: float = BEND_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64, 64, 3) uint8 -> (bend (N,) bool, seen (N,) bool): whether the road ahead bends, and
    whether the road ahead was seen at all (bend is False where it was not)."""
    amount = bend_amount(road_centres(frames))
    seen = ~np.isnan(amount)
    return seen & (np.nan_to_num(amount) > threshold), seen


def bend_fraction(frames: np.ndarray) -> dict:
    """{"frames", "road_seen": fraction of frames showing the road ahead, "bend": fraction of those
    whose road bends}; skip the zoom-in (`ZOOM_STEPS`) of real episodes before calling.

    The detector is checked against the geometry (`bend_agreement`) on a car that follows the road;
    for a car that crosses the road at a large angle, a road that does not run ahead counts as a bend
    too. Read "bend" together with "road_seen"."""
    bend, seen = bends(frames)
    return {"frames": int(len(frames)), "road_seen": float(seen.mean()) if len(frames) else float("nan"),
            "bend": float(bend[seen].mean()) if seen.any() else float("nan")}


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def road_turn_ahead(car_xy: np.ndarray, track: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The geometry's answer: (turn (T,) radians, off (T,) bool).

    turn: how much the track's heading changes between TURN_NEAR and TURN_FAR world units ahead of the
    track point nearest the car (car_xy (T, 2), track centre line (N, 2) from `env.track_of_seed`,
    driven in index order as the heuristic driver does); off: the car is off the road there.
    """
    from wmlib.env import TRACK_HALF_WIDTH

    d2 = ((np.asarray(car_xy)[:, None, :] - track[None]) ** 2).sum(-1)
    nearest = d2.argmin(axis=1)
    seg = np.roll(track, -1, axis=0) - track
    heading = np.arctan2(seg[:, 1], seg[:, 0])
    step = float(np.median(np.hypot(seg[:, 0], seg[:, 1])))  # 3.5 world units between points
    near, far = (nearest + round(TURN_NEAR / step)) % len(track), (nearest + round(TURN_FAR / step)) % len(track)
    return _wrap(heading[far] - heading[near]), np.sqrt(d2.min(axis=1)) > TRACK_HALF_WIDTH


def bend_agreement(episodes: Sequence[Episode], tracks: dict[int, np.ndarray] | None = None,
                   threshold: float = BEND_PIXELS) -> dict:
    """The bend detector against the track geometry, on real episodes with `info["car_xy"]` driven
    along the track (heuristic or recovery; not mirrored), frames after the zoom-in where the car is
    on the road. Geometry says bend when |road_turn_ahead| > BEND_TURN.

    Returns {"frames", "seen" (fraction where the detector found the road), and over those: "accuracy",
    "balanced_accuracy" (mean of the two recalls, fair when bends are rarer than straights),
    "precision", "recall", "geometry_bend" and "detector_bend" (the two fractions)}.
    """
    from wmlib.env import track_of_seed

    tracks = dict(tracks or {})
    truths: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    seens: list[np.ndarray] = []
    for ep in episodes:
        if ep.seed not in tracks:
            tracks[ep.seed] = track_of_seed(ep.seed)
        turn, off = road_turn_ahead(ep.info["car_xy"], tracks[ep.seed])
        keep = ~off & (np.arange(len(ep)) >= ZOOM_STEPS)
        b, s = bends(ep.frames[keep], threshold)
        truths.append(np.abs(turn[keep]) > BEND_TURN)
        preds.append(b)
        seens.append(s)
    truth, pred, seen = map(np.concatenate, (truths, preds, seens))
    t, p = truth[seen], pred[seen]
    return {"frames": int(len(truth)), "seen": float(seen.mean()), "accuracy": float((t == p).mean()),
            "balanced_accuracy": float(0.5 * (p[t].mean() + (~p[~t]).mean())),
            "precision": float(t[p].mean()), "recall": float(p[t].mean()),
            "geometry_bend": float(t.mean()), "detector_bend": float(p.mean())}


def dream_frames(vae, dream: DreamParams, vec: np.ndarray, rollouts: int = 8, steps: int = 1000,
                 every: int = 4, seed: int = 0) -> np.ndarray:
    """What controller `vec` (flat) sees in `rollouts` dreams of `steps` steps: V's decoding of the
    dream's z every `every` steps while the dream lasts -> (N, 64, 64, 3) uint8."""
    from wmlib.vae import decode_latents
    from wmlib.viz import to_uint8

    m = dream.mdnrnn
    controller = from_flat(jnp.asarray(vec, jnp.float32), m.z_dim, m.hidden)
    zs = []
    for key in jax.random.split(jax.random.PRNGKey(seed), rollouts):
        _, traj = rollout_trajectory(key, controller, dream, steps)
        done = np.asarray(traj.done)
        alive = np.concatenate([[True], ~done[:-1]])  # z[t] is the state before step t
        zs.append(np.asarray(traj.z)[alive][::every])
    return to_uint8(decode_latents(vae, np.concatenate(zs)))


# ---- reward calibration ----------------------------------------------------------------------------

def reward_calibration(episodes: Sequence[Episode], predict: Callable[[Episode], np.ndarray]) -> dict:
    """M's predicted reward (`predict(ep) -> (T,)`, e.g. `sim2real.predict_along_episode`'s reward_pred)
    against the real reward, summed along real episodes.

    Returns {"drivers": {policy: {"episodes", "steps", "real_total" and "pred_total" (mean per
    episode), "real_per_step", "pred_per_step"}}, "curves": {policy: [(real cumsum (T,), predicted
    cumsum (T,)), ...]}}. A calibrated M has pred_total close to real_total for every driver.
    """
    drivers: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for ep in episodes:
        pred = np.asarray(predict(ep), np.float64)
        if pred.shape != ep.rewards.shape:
            raise ValueError(f"predicted rewards have shape {pred.shape}, the episode's rewards {ep.rewards.shape}")
        curves.setdefault(ep.policy, []).append((np.cumsum(ep.rewards, dtype=np.float64), np.cumsum(pred)))
    for policy, runs in curves.items():
        steps = sum(len(real) for real, _ in runs)
        real_sum, pred_sum = sum(real[-1] for real, _ in runs), sum(pred[-1] for _, pred in runs)
        drivers[policy] = {"episodes": len(runs), "steps": steps, "real_total": float(real_sum / len(runs)),
                           "pred_total": float(pred_sum / len(runs)), "real_per_step": float(real_sum / steps),
                           "pred_per_step": float(pred_sum / steps)}
    return {"drivers": drivers, "curves": curves}


# ---- steering response -----------------------------------------------------------------------------

JERK_STEER, JERK_HOLD = 0.3, 3  # a jerk: the wheel jumps to a value held for JERK_HOLD steps, |steer| >= this


def road_readout(mu: np.ndarray, steer: np.ndarray) -> np.ndarray:
    """Least-squares read-out (z_dim + 1,) (weights, then bias) of the steering from V's means: fitted on
    the heuristic driver, whose steering follows the road, it reads where the road goes."""
    x = np.concatenate([np.asarray(mu, np.float64), np.ones((len(mu), 1))], axis=1)
    return np.linalg.lstsq(x, np.asarray(steer, np.float64), rcond=None)[0]


def read(readout: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """The read-out applied to latents (..., z_dim)."""
    return np.asarray(mu, np.float64) @ readout[:-1] + readout[-1]


def jerk_events(steer: np.ndarray, start: int = ZOOM_STEPS, horizon: int = 24) -> np.ndarray:
    """Steps t >= start where the wheel jumps to a value of |steer| >= JERK_STEER held for JERK_HOLD
    steps (the recovery driver's mistakes: steering that does not follow the frame), with `horizon`
    steps after it."""
    s = np.asarray(steer)
    t = np.arange(max(start, 1), len(s) - max(horizon, JERK_HOLD))
    held = np.all([s[t + k] == s[t] for k in range(1, JERK_HOLD)], axis=0)
    return t[(np.abs(s[t]) >= JERK_STEER) & held & (s[t - 1] != s[t])]


@eqx.filter_jit
def _dream_reads(mdnrnn, state, actions: Float[Array, "H 3"], w: Float[Array, " z"], key: jax.Array,
                 samples: int) -> Float[Array, " H"]:
    """`samples` dreams from `state` (`dream.start_from_frame`) fed `actions`: the read-out `w` of each
    dreamed latent, averaged over the dreams."""
    no_c = jnp.zeros(len(actions), bool)
    c = Controller(mdnrnn.z_dim, mdnrnn.hidden)
    zs = jax.vmap(lambda k: drive(k, state, mdnrnn, jnp.float32(1.0), actions, no_c, c).z[1:])(
        jax.random.split(key, samples))
    return (zs @ w).mean(axis=0)


def steering_response(mdnrnn, episodes: Sequence[dict], readout: np.ndarray, horizon: int = 24, warmup: int = 40,
                      samples: int = 32, seed: int = 0) -> dict:
    """How the road read-out moves after each jerk of the wheel, in reality and in M's dream.

    `episodes`: encoded episodes (dicts with "mu" (T+1, z) or (T, z) and "actions" (T, 3)) of a driver
    that jerks the wheel (`jerk_events`). For each jerk at step t, sign-aligned with the jerk: the real
    change read(mu[t+k]) - read(mu[t]), k = 1..horizon; the dream's, M warmed on the `warmup` real steps
    before t and then fed the real actions; and the dream's with the same actions but the wheel held
    straight (steer 0). Returns {"events", "real", "dream", "dream_straight"} (mean curves, lists of
    length horizon) and "ratio": the dream's steering effect (dream - dream_straight) over the real
    effect (real - dream_straight), both averaged over the horizon (1: the dream answers the wheel as
    reality does, 0: it ignores it).
    """
    w = jnp.asarray(readout[:-1], jnp.float32)
    key = jax.random.PRNGKey(seed)
    real: list[np.ndarray] = []
    dream: list[np.ndarray] = []
    straight: list[np.ndarray] = []
    for ep in episodes:
        mu, act = np.asarray(ep["mu"], np.float32), np.asarray(ep["actions"], np.float32)
        reads = read(readout, mu)
        for t in jerk_events(act[:, 0], start=max(ZOOM_STEPS, warmup), horizon=horizon):
            if t + horizon >= len(mu):
                continue
            sign = np.sign(act[t, 0])
            fut = act[t:t + horizon]
            still = fut.copy()
            still[:, 0] = 0.0
            key, k = jax.random.split(key)
            base = reads[t]
            real.append(sign * (reads[t + 1:t + horizon + 1] - base))
            state = start_from_frame(mdnrnn, jnp.asarray(mu), jnp.asarray(act), int(t), warmup)  # once per jerk
            for out, a in ((dream, fut), (straight, still)):
                out.append(sign * (np.asarray(_dream_reads(mdnrnn, state, jnp.asarray(a), w, k, samples))
                                   + readout[-1] - base))
    if not real:
        raise WMError("steering_response found no jerk of the wheel in the episodes given (the recovery "
                      "driver's data have them)")
    real_c, dream_c, straight_c = (np.mean(x, axis=0) for x in (real, dream, straight))
    effect = float(np.mean(real_c - straight_c))
    return {"events": len(real), "real": real_c.tolist(), "dream": dream_c.tolist(),
            "dream_straight": straight_c.tolist(),
            "ratio": float(np.mean(dream_c - straight_c)) / effect if effect else float("nan")}


# ---- figures ---------------------------------------------------------------------------------------

def rank_figure(rank: dict):
    """Dream score against real score per controller, one panel per horizon, Spearman in the title."""
    from wmlib.figures import _plt

    plt = _plt()
    dream, real = np.asarray(rank["dream"]), np.asarray(rank["real"])
    fig, axes = plt.subplots(1, len(rank["horizons"]), figsize=(3.6 * len(rank["horizons"]), 3.4), squeeze=False)
    for j, (ax, h) in enumerate(zip(axes[0], rank["horizons"])):
        ax.errorbar(dream[:, j], real.mean(axis=1), real.std(axis=1), fmt="none", ecolor="0.7", lw=0.8)
        points = ax.scatter(dream[:, j], real.mean(axis=1), c=rank["generations"], cmap="viridis", s=18, zorder=3)
        ax.set_title(f"{h} dream steps: Spearman {rank['spearman'][str(h)]:.2f}", fontsize=9)
        ax.set_xlabel("dream return (mean)")
    axes[0, 0].set_ylabel(f"real return (mean of {real.shape[1]})")
    fig.colorbar(points, ax=axes[0, -1], label="generation")
    fig.tight_layout()
    return fig


def bend_figure(bend: dict):
    """Fraction of frames whose road bends ahead: per source of frames, the raw frames, V's
    reconstructions, the track geometry, and the dream."""
    from wmlib.figures import _plt

    plt = _plt()
    labels = {"raw": "real frames", "recon": "V's reconstructions", "geometry": "track geometry",
              "dream": "dream (decoded)"}
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(bend), 3.2))
    ticks, shown = [], set()
    for i, (name, parts) in enumerate(bend.items()):
        kinds = [k for k in labels if k in parts]
        for j, kind in enumerate(kinds):
            value = parts[kind] if kind == "geometry" else parts[kind]["bend"]
            ax.bar(i + (j - (len(kinds) - 1) / 2) * 0.2, value, width=0.2, color=f"C{list(labels).index(kind)}",
                   label=None if kind in shown else labels[kind])
            shown.add(kind)
        seen = parts.get("raw", parts.get("dream"))["road_seen"]
        ticks.append(f"{name}\nroad seen in {seen:.0%}")
    ax.set_xticks(range(len(bend)), ticks, fontsize=8)
    ax.set_ylabel("frames with a bend ahead\n(of those showing the road)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def reward_figure(calibration: dict):
    """Cumulative real reward (solid) and M's prediction (dashed) along each episode, one panel per driver."""
    from wmlib.figures import _plt

    plt = _plt()
    curves = calibration["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3), squeeze=False)
    for ax, (policy, runs) in zip(axes[0], curves.items()):
        for i, (real, pred) in enumerate(runs):
            color = f"C{i % 10}"
            ax.plot(real, color=color, lw=1)
            ax.plot(pred, color=color, lw=1, ls="--")
        d = calibration["drivers"][policy]
        ax.set_title(f"{policy}: real {d['real_total']:.0f}, M {d['pred_total']:.0f}", fontsize=9)
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("cumulative reward\n(solid: real, dashed: M)")
    fig.tight_layout()
    return fig


def steering_figure(response: dict):
    """The road read-out after a jerk of the wheel: reality, the dream fed the same actions, and the
    dream with the wheel held straight."""
    from wmlib.figures import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = np.arange(1, len(response["real"]) + 1)
    ax.plot(steps, response["real"], color="k", lw=2, label="real")
    ax.plot(steps, response["dream"], color="C1", label="dream, same actions")
    ax.plot(steps, response["dream_straight"], color="C0", ls="--", label="dream, wheel straight")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("steps after the jerk")
    ax.set_ylabel("change of the road read-out\n(in the jerk's direction)")
    ax.set_title(f"steering response over {response['events']} jerks: dream/real {response['ratio']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def hold_figure(holds: dict):
    """Steps until the car leaves the road with the wheel held, per held |steer|: reality and the dream."""
    from wmlib.figures import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steers = list(holds)
    x = np.arange(len(steers))
    for dx, (key, label, color) in zip((-0.2, 0.2), (("real_steps", "real", "k"), ("dream_steps", "dream", "C1"))):
        ax.bar(x + dx, [holds[s][key] for s in steers], width=0.4, color=color, label=label)
    ax.set_xticks(x, [f"|steer| {s}" for s in steers])
    ax.set_ylabel("steps until off the road")
    ax.set_title(f"holding the wheel ({sum(h['branches'] for h in holds.values())} branches)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def steering_report(mdnrnn, encoded: dict[str, dict[str, np.ndarray]], episodes: int = STEERING_PROBES,
                    seed: int = 0) -> dict:
    """`steering_response` on a collection's encodings (`data.load_encoded`): the read-out fitted on the
    track followers' frames after the zoom-in, the jerks taken from up to `episodes` unmirrored
    recovery episodes (`data.steering_probes`; branches are never cut from them)."""
    followers = [e for n, e in encoded.items() if n.split("_")[0] in TRACK_FOLLOWERS]
    jerky = [encoded[n] for n in steering_probes(encoded, episodes)]
    if not followers or not jerky:
        raise WMError("the steering response needs encoded recovery episodes (they jerk the wheel) and "
                      f"track followers ({', '.join(TRACK_FOLLOWERS)}); the collection has {sorted(encoded)[:5]}...")
    readout = road_readout(np.concatenate([e["mu"][ZOOM_STEPS:len(e["actions"])] for e in followers]),
                           np.concatenate([e["actions"][ZOOM_STEPS:, 0] for e in followers]))
    return steering_response(mdnrnn, jerky, readout, seed=seed)



def _until_end(ended: np.ndarray, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., H) end flags and rewards -> the steps before the first end (H if none) and the reward over them."""
    H = ended.shape[-1]
    steps = np.where(ended.any(-1), np.argmax(ended, axis=-1), H)
    return steps, np.where(np.arange(H) < steps[..., None], rewards, 0.0).sum(-1)


@eqx.filter_jit
def _held_dreams(mdnrnn, state, actions: Float[Array, "H 3"], no_c: Controller, key: jax.Array, samples: int):
    """`samples` dreams from `state` fed `actions` (a `DreamDrive` with a leading samples axis)."""
    return jax.vmap(lambda k: drive(k, state, mdnrnn, jnp.float32(1.0), actions, jnp.zeros(len(actions), bool),
                                    no_c))(jax.random.split(key, samples))


def hold_response(mdnrnn, encoded: dict[str, dict[str, np.ndarray]], branches: dict[str, dict[str, np.ndarray]],
                  warmup: int = 40, samples: int = 8, seed: int = 0) -> dict:
    """Does the dream punish holding the wheel as reality does? On branches (`rollouts.collect_branches`;
    held out from M's training: `wm branches --probes`), each a real state with the wheel then held at
    one steer for H steps: M starts from that state (warmed on the `warmup` real steps before it) and
    dreams the branch's actions `samples` times. Reality's end is the first step that leaves the car
    off the road; the dream's, the first whose done probability passes 0.5 (an M trained with
    `offroad_done`). Per held |steer|: {"branches", "real_steps", "dream_steps" (mean steps before the
    end, H when none), "real_reward", "dream_reward" (mean reward over those steps)}.
    """
    no_c = Controller(mdnrnn.z_dim, mdnrnn.hidden)
    key = jax.random.PRNGKey(seed)
    rows: dict[float, list] = {}
    for source, b in sorted(branches.items()):
        if source not in encoded:
            raise WMError(f"hold_response: the encoded collection has no episode {source} (the branches' source)")
        ep = encoded[source]
        for k, t0 in enumerate(int(t) for t in b["t0"]):
            if np.ptp(b["actions"][k, :, 0]) > 0:
                raise WMError(f"hold_response: branch {k} of {source} does not hold the wheel (collect the hold "
                              "test's branches with `wm branches --holds`)")
            state = start_from_frame(mdnrnn, jnp.asarray(ep["mu"]), jnp.asarray(ep["actions"]), t0, warmup)
            actions = jnp.asarray(b["actions"][k])
            key, sub = jax.random.split(key)
            drives = _held_dreams(mdnrnn, state, actions, no_c, sub, samples)
            d_steps, d_reward = _until_end(np.asarray(drives.done_prob) > 0.5, np.asarray(drives.reward))
            r_steps, r_reward = _until_end(b["offroad"][k] > 0, b["rewards"][k])
            rows.setdefault(round(abs(float(b["actions"][k, 0, 0])), 2), []).append(
                (r_steps, d_steps.mean(), r_reward, d_reward.mean()))
    if not rows:
        raise WMError("hold_response got no branches")
    return {str(s): {"branches": len(r), **{name: float(np.mean([x[i] for x in r])) for i, name in
                                            enumerate(("real_steps", "dream_steps", "real_reward", "dream_reward"))}}
            for s, r in sorted(rows.items())}


# ---- the report ------------------------------------------------------------------------------------

def _driver_episodes(data_dir: Path, per_driver: int) -> list[Episode]:
    """Up to `per_driver` unmirrored episodes of each policy in a collection, in file order."""
    from wmlib.data import episode_files, load_episode

    picked: dict[str, list[Path]] = {}
    for path in episode_files(data_dir, mirrored=False):
        picked.setdefault(path.name.split("_")[0], []).append(path)
    return [load_episode(p) for paths in picked.values() for p in paths[:per_driver]]


def _frame_bends(vae, episodes: Sequence[Episode]) -> dict:
    """Bend fractions of real episodes after the zoom-in: raw frames, V's reconstructions and, for
    drivers that follow the track in its direction (`road_turn_ahead`), the track geometry."""
    from wmlib.env import track_of_seed
    from wmlib.vae import reconstruct
    from wmlib.viz import to_uint8

    frames = np.concatenate([ep.frames[ZOOM_STEPS:] for ep in episodes])
    out: dict[str, dict | float] = {"raw": bend_fraction(frames),
                                    "recon": bend_fraction(to_uint8(reconstruct(vae, frames)))}
    followers = [ep for ep in episodes if ep.policy in TRACK_FOLLOWERS and "car_xy" in ep.info]
    if followers:
        turns = [road_turn_ahead(ep.info["car_xy"], track_of_seed(ep.seed))[0][ZOOM_STEPS:] for ep in followers]
        out["geometry"] = float((np.abs(np.concatenate(turns)) > BEND_TURN).mean())
    return out


def fidelity_report(agent_dir: str | os.PathLike, data_dir: str | os.PathLike, evolve_dir: str | os.PathLike,
                    cfg: EvolveConfig, out_dir: str | os.PathLike, controllers: int = 20, real_episodes: int = 8,
                    dream_rollouts: int = 64, horizons: Sequence[int] = HORIZONS, real_seed: int = SELECTION_SEED,
                    workers: int | None = None, fast: bool = True,
                    real_score: Callable[[np.ndarray, Path | None], np.ndarray] | None = None,
                    per_driver: int = 4, bend_rollouts: int = 8, seed: int = 0, progress: bool = True,
                    holds: str | os.PathLike | None = None) -> dict:
    """All four measurements for an agent folder (V, M), a collection encoded by that V, and an
    evolution run in that M's dream (`cfg`: its dream settings: tau, start, road_starts); writes
    OUT_DIR/fidelity.json and fidelity_rank.png, fidelity_bends.png, fidelity_reward.png,
    fidelity_steering.png.

    Real episodes: `real_episodes` per controller on selection-range seeds from `real_seed`
    (`real_scorer`, or `real_score(vec, save_dir)` given), the last controller's kept for the bend
    and reward measurements. Bends and rewards also use `per_driver` episodes of each driver of the
    collection; the dream's frames come from `bend_rollouts` dreams of that last controller.
    With `holds` (a folder of branches that hold the wheel, from episodes M did not train on: `wm branches
    --probes --holds`) the report adds the hold test (`hold_response`, "holds", fidelity_holds.png).
    Returns the JSON's content.
    """
    from wmlib.agent import check_compatible, part_path
    from wmlib.data import EpisodeError, encoded_dir, episode_files, load_branches, load_encoded, load_episode
    from wmlib.evolve import HISTORY_FILE, history
    from wmlib.figures import save
    from wmlib.files import ensure_dir, write_json
    from wmlib.fitness import dream_params
    from wmlib.mdnrnn import load_mdnrnn
    from wmlib.paths import FIDELITY
    from wmlib.pipeline import vae_id_of
    from wmlib.sim2real import predict_along_episode
    from wmlib.vae import load_vae

    agent_dir, data_dir, evolve_dir = Path(agent_dir), Path(data_dir), Path(evolve_dir)
    vae, _ = load_vae(part_path(agent_dir, "V"))
    mdnrnn, _ = load_mdnrnn(part_path(agent_dir, "M"))
    check_compatible(vae, mdnrnn, where=str(agent_dir))
    if not (evolve_dir / HISTORY_FILE).is_file():
        raise FileNotFoundError(f"{evolve_dir / HISTORY_FILE} is missing: it holds an evolution run's search means "
                                f"per generation (an evolution run writes it into its folder)")
    means = history(evolve_dir)["mean"]
    if means.ndim != 2 or means.shape[1] != n_params(mdnrnn.z_dim, mdnrnn.hidden):
        raise WMError(f"{evolve_dir / HISTORY_FILE} holds search means of shape {means.shape}; controllers for "
                      f"the M in {agent_dir} have {n_params(mdnrnn.z_dim, mdnrnn.hidden)} parameters")
    vae_id = vae_id_of(part_path(agent_dir, "V"))
    try:
        encoded = load_encoded(data_dir, vae_id)
    except EpisodeError as e:
        raise EpisodeError(f"{e}. {encoded_dir(data_dir, vae_id)}/*.npz would hold V's encoding of every episode "
                           f"(mu, logvar, actions, rewards): encoding the collection with "
                           f"{part_path(agent_dir, 'V')} writes them") from None
    dream = dream_params(mdnrnn, encoded, cfg, horizon=max(horizons))
    out = ensure_dir(out_dir, "fidelity output folder")
    steering = steering_report(mdnrnn, encoded, seed=seed)  # first: a collection without jerks fails at once
    held = hold_response(mdnrnn, encoded, load_branches(holds), seed=seed) if holds is not None else None

    final_dir = out / "real_episodes"  # the last controller's real episodes, of this report only
    for stale in final_dir.glob("agent_*.npz"):
        stale.unlink()
    rank = rank_agreement(dream, means, real_score or real_scorer(agent_dir, real_episodes, real_seed, workers, fast),
                          controllers, horizons, dream_rollouts, seed, save_final=final_dir, progress=progress)
    final = np.asarray(means)[-1]

    drivers = _driver_episodes(data_dir, per_driver)
    own = [load_episode(p) for p in episode_files(final_dir)] if final_dir.is_dir() else []
    groups: dict[str, list[Episode]] = {}
    for ep in drivers + own:
        groups.setdefault(f"{ep.policy} (real)", []).append(ep)
    bend = {name: _frame_bends(vae, eps) for name, eps in tqdm(groups.items(), desc="bends", unit="driver",
                                                                 disable=not progress)}
    bend["controller (dream)"] = {"dream": bend_fraction(dream_frames(vae, dream, final, bend_rollouts,
                                                                      max(horizons), seed=seed))}
    followers = [ep for ep in drivers if ep.policy in TRACK_FOLLOWERS and "car_xy" in ep.info]
    check = bend_agreement(followers) if followers else None

    calibration = reward_calibration(
        tqdm(drivers + own, desc="reward calibration", unit="ep", disable=not progress),
        lambda ep: predict_along_episode(vae, mdnrnn, ep)["reward_pred"])

    report = {"agent": str(agent_dir), "data": str(data_dir), "evolve": str(evolve_dir),
              "dream": dataclasses.asdict(cfg), "rank": rank, "bends": bend, "bend_detector_vs_geometry": check,
              "reward": calibration["drivers"], "steering": steering, **({"holds": held} if held else {})}
    write_json(out / FIDELITY, report)
    save(rank_figure(rank), out / "fidelity_rank.png")
    save(bend_figure(bend), out / "fidelity_bends.png")
    save(reward_figure(calibration), out / "fidelity_reward.png")
    save(steering_figure(steering), out / "fidelity_steering.png")
    if held:
        save(hold_figure(held), out / "fidelity_holds.png")
    return report
