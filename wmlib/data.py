"""Episodes on disk: one compressed .npz per episode, a manifest per collection, mirroring, batches.

An episode file holds, for T steps:
  frames    (T, 64, 64, 3) uint8   the preprocessed observation seen before acting
  actions   (T, 3) float32         (steer, gas, brake) taken at that frame
  rewards   (T,) float32           reward received after the action
  terminated, truncated            bool scalars: how the episode ended
  policy, seed, mirrored           who drove, on which env seed, and whether left-right flipped
Files are written atomically; a truncated or foreign file is reported by path when read.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable

import numpy as np

from wmlib.errors import WMError
from wmlib.env import FRAME_SHAPE, offroad_steps, track_of_seed
from wmlib.files import atomic_write, write_json

EPISODE_FORMAT = 1
MANIFEST = "manifest.json"


class EpisodeError(WMError):
    """An episode file is missing, truncated, foreign, or inconsistent."""


@dataclass
class Episode:
    frames: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool
    policy: str
    seed: int
    mirrored: bool = False
    info: dict = field(default_factory=dict)  # optional per-step extras (e.g. car position), arrays of length T

    def __post_init__(self):
        T = len(self.frames)
        if self.frames.shape[1:] != FRAME_SHAPE or self.frames.dtype != np.uint8:
            raise EpisodeError(f"frames must be (T, 64, 64, 3) uint8, got {self.frames.shape} {self.frames.dtype}")
        if self.actions.shape != (T, 3) or self.rewards.shape != (T,):
            raise EpisodeError(f"actions must be ({T}, 3) and rewards ({T},), got {self.actions.shape} "
                               f"and {self.rewards.shape}")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def total_reward(self) -> float:
        return float(self.rewards.sum())

    @property
    def dones(self) -> np.ndarray:
        """(T,) float32: 1 at the last step of a terminated episode (the target of M's done head)."""
        d = np.zeros(len(self), np.float32)
        if self.terminated and len(self):
            d[-1] = 1.0
        return d

    def offroad(self, track: np.ndarray | None = None) -> np.ndarray:
        """(T,) float32: 1 where action t left the car off the road (its centre beyond the road's half
        width at step t+1; the last step counts as its own) or drove it off the map (reward -100).
        The target of M's done head when the dream should end off the road. All zeros when the
        episode has no car positions. `track` (the seed's centre line) saves regenerating it."""
        off = np.zeros(len(self), np.float32)
        if "car_xy" in self.info and len(self):
            xy = np.asarray(self.info["car_xy"], np.float32)
            off = offroad_steps(np.concatenate([xy[1:], xy[-1:]]), track_of_seed(self.seed) if track is None
                                else track).astype(np.float32)
        if self.terminated and len(self) and self.rewards[-1] <= -50:
            off[-1] = 1.0
        return off

    def summary(self) -> dict:
        return {"policy": self.policy, "seed": self.seed, "steps": len(self), "return": self.total_reward,
                "terminated": self.terminated, "mirrored": self.mirrored}


def episode_name(policy: str, seed: int, mirrored: bool = False) -> str:
    return f"{policy}_{seed:06d}{'_mirror' if mirrored else ''}.npz"


def save_episode(path: str | os.PathLike, ep: Episode) -> Path:
    """Atomically write one episode as a compressed .npz."""
    arrays = {f"info_{k}": np.asarray(v) for k, v in ep.info.items()}
    with atomic_write(path) as f:
        np.savez_compressed(
            f, format=np.int64(EPISODE_FORMAT), frames=ep.frames, actions=ep.actions.astype(np.float32),
            rewards=ep.rewards.astype(np.float32), terminated=np.bool_(ep.terminated),
            truncated=np.bool_(ep.truncated), policy=np.str_(ep.policy), seed=np.int64(ep.seed),
            mirrored=np.bool_(ep.mirrored), **arrays)  # type: ignore[arg-type]  # numpy stubs: **arrays read as allow_pickle
    return Path(path)


def load_episode(path: str | os.PathLike) -> Episode:
    """Read and validate an episode file; any defect is reported with the file's path."""
    path = Path(path)
    if not path.is_file():
        raise EpisodeError(f"episode file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or "frames" not in z.files:
                raise EpisodeError(f"{path} is not a wmlib episode file (keys: {', '.join(z.files) or 'none'})")
            if int(z["format"]) != EPISODE_FORMAT:
                raise EpisodeError(f"{path} has episode format {int(z['format'])}, expected {EPISODE_FORMAT}")
            return Episode(
                frames=z["frames"], actions=z["actions"], rewards=z["rewards"],
                terminated=bool(z["terminated"]), truncated=bool(z["truncated"]), policy=str(z["policy"]),
                seed=int(z["seed"]), mirrored=bool(z["mirrored"]),
                info={k[5:]: z[k] for k in z.files if k.startswith("info_")})
    except EpisodeError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise EpisodeError(f"{path} is truncated or not a wmlib episode file ({type(e).__name__}: {e})") from None


def mirror_episode(ep: Episode) -> Episode:
    """The left-right mirror image: frames flipped horizontally and steering negated.

    A track turning left becomes one turning right, which removes the left-turn bias of
    CarRacing's counter-clockwise tracks. Gas, brake and rewards are unchanged.
    """
    actions = ep.actions.copy()
    actions[:, 0] = -actions[:, 0]
    return Episode(frames=np.ascontiguousarray(ep.frames[:, :, ::-1]), actions=actions, rewards=ep.rewards.copy(),
                   terminated=ep.terminated, truncated=ep.truncated, policy=ep.policy, seed=ep.seed,
                   mirrored=not ep.mirrored, info=dict(ep.info))


# ---- collections ---------------------------------------------------------------------------------

def episode_files(folder: str | os.PathLike, mirrored: bool | None = None) -> list[Path]:
    """The episode files of a collection folder, sorted; `mirrored` filters by the file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"collection folder {folder} does not exist")
    files = sorted(p for p in folder.glob("*.npz") if not p.name.startswith("."))
    if mirrored is not None:
        files = [p for p in files if p.stem.endswith("_mirror") == mirrored]
    return files


def write_manifest(folder: str | os.PathLike) -> dict:
    """(Re)write `manifest.json` from the episode files present: one entry per episode."""
    folder = Path(folder)
    entries = {}
    old = read_manifest(folder)
    for p in episode_files(folder):
        if p.name in old and old[p.name].get("bytes") == p.stat().st_size:
            entries[p.name] = old[p.name]
        else:
            entries[p.name] = {**load_episode(p).summary(), "bytes": p.stat().st_size}
    manifest = {"format": EPISODE_FORMAT, "episodes": entries,
                "frames": int(sum(e["steps"] for e in entries.values()))}
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest's episode entries by file name ({} when there is none yet)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["episodes"]
    except (json.JSONDecodeError, KeyError):
        raise EpisodeError(f"{path} is not a wmlib collection manifest") from None


# ---- batches -------------------------------------------------------------------------------------

class FrameSampler:
    """Random frame batches from a collection with bounded memory.

    Training is split into blocks of `block_batches` batches; each block draws its frames from
    `buffer_episodes` episodes chosen at random for that block, so memory stays at about
    buffer_episodes x 12 MB however large the collection is, and over many blocks every episode is
    visited. With `mirror`, each frame is flipped left-right with probability 1/2 (the mirror
    augmentation without stored copies). A batch depends only on (seed, index), so a resumed training
    sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, files: list[Path], batch_size: int, seed: int = 0, mirror: bool = False,
                 buffer_episodes: int = 32, block_batches: int = 100):
        if not files:
            raise EpisodeError("no episodes to sample frames from (the collection is empty)")
        self.files, self.batch_size, self.seed, self.mirror = list(files), batch_size, seed, mirror
        self.buffer_episodes, self.block_batches = min(buffer_episodes, len(files)), block_batches
        self._block: int | None = None
        self._buffer: list[np.ndarray] = []

    def _load_block(self, block: int) -> list[np.ndarray]:
        if block != self._block:
            self._buffer = []  # free the old block before loading the new one
            rng = np.random.default_rng([self.seed, 1, block])
            chosen = rng.permutation(len(self.files))[: self.buffer_episodes]
            self._buffer = [load_episode(self.files[i]).frames for i in sorted(chosen)]
            self._block = block
        return self._buffer

    def batch(self, index: int) -> np.ndarray:
        """Batch number `index`: (batch_size, 64, 64, 3) uint8."""
        buffer = self._load_block(index // self.block_batches)
        rng = np.random.default_rng([self.seed, 2, index])
        out = np.empty((self.batch_size, *FRAME_SHAPE), np.uint8)
        for j, e in enumerate(rng.integers(len(buffer), size=self.batch_size)):
            out[j] = buffer[e][rng.integers(len(buffer[e]))]
        if self.mirror:
            flip = rng.random(self.batch_size) < 0.5
            out[flip] = out[flip, :, ::-1]
        return out


# ---- encodings (V's posterior per step, the input of M) -----------------------------------------

ENCODED = "encoded"


def encoded_dir(folder: str | os.PathLike, vae_id: str) -> Path:
    """Where the encodings of a collection by the V with id `vae_id` live: FOLDER/encoded/VAE_ID/."""
    return Path(folder) / ENCODED / vae_id


def encode_collection(folder: str | os.PathLike, encode_fn, vae_id: str, mirror: bool = False,
                      progress: bool = True) -> Path:
    """Encode every episode of a collection with `encode_fn(frames) -> (mu, logvar)`.

    Each episode becomes FOLDER/encoded/VAE_ID/NAME.npz with mu, logvar (T, z_dim), actions,
    rewards, dones, offroad (`Episode.offroad`) and the V's id, written atomically; existing files
    are skipped (resumable). With
    `mirror`, episodes without a stored mirror image also get the encoding of their mirrored frames.
    """
    from tqdm.auto import tqdm

    out = encoded_dir(folder, vae_id)
    out.mkdir(parents=True, exist_ok=True)
    files = episode_files(folder)
    if not files:
        raise EpisodeError(f"collection folder {folder} holds no episodes to encode")
    names = {p.name for p in files}
    jobs = [(p, False) for p in files]
    if mirror:
        jobs += [(p, True) for p in files if not p.stem.endswith("_mirror")
                 and p.name.replace(".npz", "_mirror.npz") not in names]
    tracks: dict[int, np.ndarray] = {}  # an episode and its mirror image share a track
    for path, flip in tqdm(jobs, desc="encode", unit="ep", disable=not progress):
        target = out / (path.name.replace(".npz", "_mirror.npz") if flip else path.name)
        if target.exists():
            continue
        ep = load_episode(path)
        if "car_xy" in ep.info and ep.seed not in tracks:
            tracks[ep.seed] = track_of_seed(ep.seed)
        offroad = ep.offroad(tracks.get(ep.seed))
        if flip:
            ep = mirror_episode(ep)
        mu, logvar = encode_fn(ep.frames)
        with atomic_write(target) as f:
            np.savez(f, mu=np.asarray(mu, np.float32), logvar=np.asarray(logvar, np.float32),
                     actions=ep.actions, rewards=ep.rewards, dones=ep.dones, offroad=offroad,
                     vae_id=np.str_(vae_id))
    return out


def load_encoded(folder: str | os.PathLike, vae_id: str) -> dict[str, dict[str, np.ndarray]]:
    """All encodings of a collection by V `vae_id`: {episode name: {mu, logvar, actions, rewards, dones,
    offroad}} (offroad all zeros in encodings made before it was recorded)."""
    path = encoded_dir(folder, vae_id)
    files = sorted(path.glob("*.npz")) if path.is_dir() else []
    if not files:
        found = [p.name for p in (Path(folder) / ENCODED).glob("*")] if (Path(folder) / ENCODED).is_dir() else []
        raise EpisodeError(f"{folder} has no encodings by V {vae_id}"
                           + (f" (it has encodings by V {', '.join(found)}: a different V)" if found else
                              "; run `wm encode` first"))
    episodes = {}
    for p in files:
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["vae_id"]) != vae_id:
                    raise EpisodeError(f"{p} was encoded by V {z['vae_id']}, not {vae_id}")
                episodes[p.name] = {k: z[k] for k in ("mu", "logvar", "actions", "rewards", "dones")}
                episodes[p.name]["offroad"] = z["offroad"] if "offroad" in z.files else np.zeros_like(z["rewards"])
        except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as e:
            if isinstance(e, EpisodeError):
                raise
            raise EpisodeError(f"{p} is truncated or not an encoding file ({type(e).__name__}: {e})") from None
    return episodes


class SequenceSampler:
    """Windows of `seq_len` steps cut from encoded episodes, for training M.

    Batch `index` belongs to epoch index // batches_per_epoch; each epoch cuts every episode into
    windows at a fresh random offset and shuffles them, so over epochs M sees every transition in
    many contexts. Windows at an episode's end are zero-padded with mask 0. A window holds seq_len + 1
    latents (inputs z_0..z_{T-1} and targets z_1..z_T). Deterministic in (seed, index).
    """

    def __init__(self, episodes: list[dict], seq_len: int, batch_size: int, seed: int = 0):
        if not episodes:
            raise EpisodeError("no encoded episodes to cut sequences from")
        self.episodes, self.seq_len, self.batch_size, self.seed = episodes, seq_len, batch_size, seed
        n_windows = sum(-(-len(e["mu"]) // seq_len) for e in episodes)
        self.batches_per_epoch = max(1, n_windows // batch_size)
        self._epoch: int | None = None
        self._windows = np.zeros((0, 2), np.int64)

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            windows = []
            for i, e in enumerate(self.episodes):
                T = len(e["mu"])
                offset = int(rng.integers(self.seq_len)) if T > self.seq_len else 0
                starts = list(range(offset, T, self.seq_len)) or [0]
                if offset:
                    starts = [0] + starts  # the start of the episode is not lost
                windows += [(i, s) for s in starts]
            self._windows = np.array(windows)[rng.permutation(len(windows))]
            self._epoch = epoch
        return self._windows

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """dict of mu, logvar (B, T+1, z), action (B, T, 3), reward, done, offroad (B, T), mask (B, T+1)."""
        epoch, k = divmod(index, self.batches_per_epoch)
        windows = self._epoch_windows(epoch)
        picked = [windows[(k * self.batch_size + j) % len(windows)] for j in range(self.batch_size)]
        return self.windows_batch(picked)

    def windows_batch(self, picked) -> dict[str, np.ndarray]:
        T, z_dim = self.seq_len, self.episodes[0]["mu"].shape[1]
        B = len(picked)
        out = {"mu": np.zeros((B, T + 1, z_dim), np.float32), "logvar": np.zeros((B, T + 1, z_dim), np.float32),
               "action": np.zeros((B, T, 3), np.float32), "reward": np.zeros((B, T), np.float32),
               "done": np.zeros((B, T), np.float32), "offroad": np.zeros((B, T), np.float32),
               "mask": np.zeros((B, T + 1), np.float32)}
        for b, (i, s) in enumerate(picked):
            e = self.episodes[i]
            n = min(T + 1, len(e["mu"]) - s)
            out["mu"][b, :n], out["logvar"][b, :n], out["mask"][b, :n] = e["mu"][s:s + n], e["logvar"][s:s + n], 1
            m = min(T, len(e["mu"]) - s)
            out["action"][b, :m], out["reward"][b, :m], out["done"][b, :m] = \
                e["actions"][s:s + m], e["rewards"][s:s + m], e["dones"][s:s + m]
            if "offroad" in e:
                out["offroad"][b, :m] = e["offroad"][s:s + m]
        return out

    def all_windows(self) -> list[dict[str, np.ndarray]]:
        """Every episode cut at offset 0 into batches (for validation metrics)."""
        windows = [(i, s) for i, e in enumerate(self.episodes) for s in range(0, len(e["mu"]), self.seq_len)]
        return [self.windows_batch(windows[j:j + self.batch_size]) for j in range(0, len(windows), self.batch_size)]


def split_episodes(names: Iterable[str], n_val: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Episode names -> (train, validation), `n_val` episodes held out; an episode and its mirror
    image ("NAME_mirror.npz") always land on the same side, so validation sees unseen tracks."""
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(name.replace("_mirror", ""), []).append(name)
    bases = sorted(groups)
    n_val = min(n_val, len(bases) - 1)
    picked = set(np.random.default_rng(seed).permutation(len(bases))[:max(n_val, 0)])
    val = [n for i, b in enumerate(bases) if i in picked for n in groups[b]]
    train = [n for i, b in enumerate(bases) if i not in picked for n in groups[b]]
    return train, val


# ---- branches: the same real state, another steering -----------------------------------------------

BRANCH_FORMAT = 1
STEERING_PROBES = 60  # unmirrored recovery episodes the steering report measures the dream on


def steering_probes(names: Iterable[str], episodes: int = STEERING_PROBES) -> list[str]:
    """The episodes `fidelity.steering_report` measures the dream's answer to the wheel on: the first
    `episodes` unmirrored recovery episodes by name. No branch is cut from them (`rollouts.collect_branches`),
    so the steering ratio of an M trained on branches is measured on episodes it never saw branched."""
    return sorted(n for n in names if n.startswith("recovery_") and "_mirror" not in n)[:episodes]


BRANCH_ARRAYS = ("t0", "frames", "actions", "rewards", "offroad")


def save_branches(path: str | os.PathLike, source: str, t0: np.ndarray, frames: np.ndarray, actions: np.ndarray,
                  rewards: np.ndarray, offroad: np.ndarray) -> Path:
    """Atomically write the branches of one recorded episode: K branch points `t0` (K,), the frames
    (K, H+1, 64, 64, 3) uint8 from frame t0 (the recorded one) on, the actions (K, H, 3) taken, and
    what followed each: rewards and offroad (K, H) (1: that action left the car off the road)."""
    with atomic_write(path) as f:
        np.savez_compressed(f, format=np.int64(BRANCH_FORMAT), source=np.str_(source), t0=np.asarray(t0, np.int64),
                            frames=np.asarray(frames, np.uint8), actions=np.asarray(actions, np.float32),
                            rewards=np.asarray(rewards, np.float32), offroad=np.asarray(offroad, np.float32))
    return Path(path)


def load_branches(*folders: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Every branch file of the folders (`rollouts.collect_branches`): {source episode file name: {t0,
    frames, actions, rewards, offroad}}, the branches of one source in several folders joined (they must
    have the same horizon); a defective file is reported by path."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for folder in map(Path, folders):
        files = sorted(p for p in folder.glob("*.npz") if not p.name.startswith(".")) if folder.is_dir() else []
        if not files:
            raise EpisodeError(f"branch folder {folder} holds no branch files; run `wm branches` first")
        for p in files:
            try:
                with np.load(p, allow_pickle=False) as z:
                    if "format" not in z.files or "source" not in z.files or int(z["format"]) != BRANCH_FORMAT:
                        raise EpisodeError(f"{p} is not a wmlib branch file of format {BRANCH_FORMAT} "
                                           f"(keys: {', '.join(z.files) or 'none'})")
                    source, found = str(z["source"]), {k: z[k] for k in BRANCH_ARRAYS}
            except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as e:
                if isinstance(e, EpisodeError):
                    raise
                raise EpisodeError(f"{p} is truncated or not a branch file ({type(e).__name__}: {e})") from None
            if source in out:
                if out[source]["frames"].shape[1:] != found["frames"].shape[1:]:
                    raise EpisodeError(f"{p}: its branches last {found['actions'].shape[1]} steps, those of "
                                       f"{source} in an earlier folder {out[source]['actions'].shape[1]}")
                found = {k: np.concatenate([out[source][k], found[k]]) for k in BRANCH_ARRAYS}
            out[source] = found
    return out


def branch_steps(*folders: str | os.PathLike) -> int:
    """The real env steps behind the branches of `folders`: each branch replays its source to t0, then
    drives its H steps (read from the files' small arrays only)."""
    steps = 0
    for folder in map(Path, folders):
        for p in sorted(folder.glob("*.npz")):
            if not p.name.startswith("."):
                with np.load(p, allow_pickle=False) as z:
                    steps += int(z["t0"].sum()) + int(np.prod(z["rewards"].shape))
    return steps


def branch_pairs(encoded: dict[str, dict[str, np.ndarray]], branches: dict[str, dict[str, np.ndarray]],
                 encode_fn, warmup: int) -> dict[str, np.ndarray]:
    """Pairs of real futures from the same state for M's branch term (`mdnrnn.branch_loss`), each also
    mirrored (frames flipped, steering negated, paired with the source's mirror image).

    For a branch at step t0 of source episode A (encodings `encoded[A]`) and `warmup` <= t0: the
    `warmup` real steps before t0 (warm_z, warm_a), z0 = V's mean of frame t0, the recorded actions
    from t0 (act_a) and the branch's (act_b), each (H, 3), and diff (H, z): V's means of A's frames
    t0+1..t0+H minus those of the branch. `encode_fn(frames) -> (mu, logvar)` is the V of `encoded`.
    """
    rows: dict[str, list] = {k: [] for k in ("warm_z", "warm_a", "z0", "act_a", "act_b", "diff")}
    for source, b in sorted(branches.items()):
        for mirrored in (False, True):
            name = source.replace(".npz", "_mirror.npz") if mirrored else source
            if name not in encoded:
                raise EpisodeError(f"branches of {source}: the encoded collection has no episode {name}")
            ep = encoded[name]
            frames = b["frames"][:, :, :, ::-1] if mirrored else b["frames"]
            K, H1 = frames.shape[:2]
            mu_b = np.asarray(encode_fn(np.ascontiguousarray(frames).reshape(K * H1, *FRAME_SHAPE))[0])
            mu_b = mu_b.reshape(K, H1, -1)
            act_b = b["actions"] * np.array([-1.0, 1.0, 1.0], np.float32) if mirrored else b["actions"]
            for k, t0 in enumerate(int(t) for t in b["t0"]):
                H = H1 - 1
                if t0 < warmup or t0 + H >= len(ep["mu"]):
                    continue
                rows["warm_z"].append(ep["mu"][t0 - warmup:t0])
                rows["warm_a"].append(ep["actions"][t0 - warmup:t0])
                rows["z0"].append(ep["mu"][t0])
                rows["act_a"].append(ep["actions"][t0:t0 + H])
                rows["act_b"].append(act_b[k])
                rows["diff"].append(ep["mu"][t0 + 1:t0 + H + 1] - mu_b[k, 1:])
    if not rows["z0"]:
        raise EpisodeError(f"no branch has {warmup} recorded steps before it (the branch term's warm-up)")
    return {k: np.asarray(v, np.float32) for k, v in rows.items()}
