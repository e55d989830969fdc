"""Real-agent throughput: frames/s of an evaluation, one episode per worker call (before) vs blocks of
K episodes driven in lockstep (after), on 1 worker and on all; and the agent's share of a step.

    uv run python bench/real_agent_speed.py [--episodes 100] [--max-steps 1000] [--batch 16]
                                            [--agent data/pretrained]

Before: every real step calls the jitted V -> M -> C for ONE frame (`agent.Agent`, `run_episode`).
After: `evaluate`, where each step runs the agents of all live episodes of a block in one call
(`agent.AgentBatch`, `run_agent_episodes`). Both drive the same episodes (env seeds 0..N-1) with the
same scores. The agent's share is timed in this process on one block of `--batch` episodes, after
a warm-up: time inside the agent's call vs inside env.step, per frame. Prints one line per
measurement and a final JSON line. Timings include each worker's JIT compilation.
"""

import argparse
import json
import os
import time

from wmlib import rollouts
from wmlib.agent import Agent, AgentBatch
from wmlib.config import PRETRAINED_DIR
from wmlib.evaluate import evaluate
from wmlib.rollouts import EpisodeSpec, default_workers, parallel_map, run_agent_episodes, run_episode


def _one_episode(spec: EpisodeSpec) -> int:
    """Worker of the per-episode path: drive one episode, return its frames."""
    return len(run_episode(spec))


def per_episode_frames(specs: list[EpisodeSpec], workers: int) -> int:
    frames = 0
    for spec, steps, error in parallel_map(_one_episode, specs, workers, progress=False):
        if error is not None:
            raise RuntimeError(f"episode on env seed {spec.seed} failed: {error}")
        frames += steps
    return frames


def timed(owner, name: str, totals: dict, key: str) -> None:
    """Wrap owner.name so that the seconds spent in it add up in totals[key]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def agent_share(specs: list[EpisodeSpec]) -> dict:
    """Per frame: ms in the agent's call and in env.step, one at a time and in lockstep (warm JIT)."""
    totals = {"agent": 0.0, "env": 0.0}
    make_env = rollouts.make_env

    def timed_env(**kwargs):
        env = make_env(**kwargs)
        timed(env, "step", totals, "env")
        return env

    rollouts.make_env = timed_env
    timed(Agent, "act", totals, "agent")
    timed(AgentBatch, "act", totals, "agent")
    warm = [EpisodeSpec(s.policy, s.seed, 2, s.fast, s.policy_kwargs) for s in specs]
    out = {}
    for path, drive in (("before", lambda ss: [run_episode(s) for s in ss]), ("after", run_agent_episodes)):
        drive(warm)
        totals.update(agent=0.0, env=0.0)
        t = time.perf_counter()
        frames = sum(map(len, drive(specs)))
        wall = time.perf_counter() - t
        out[path] = {"agent_ms": 1e3 * totals["agent"] / frames, "env_step_ms": 1e3 * totals["env"] / frames,
                     "wall_ms": 1e3 * wall / frames}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16, help="episodes a worker drives in lockstep (after)")
    parser.add_argument("--agent", default=str(PRETRAINED_DIR))
    args = parser.parse_args()
    specs = [EpisodeSpec("controller", seed, args.max_steps, policy_kwargs={"agent": args.agent, "z_mode": "sample"})
             for seed in range(args.episodes)]
    result = {"cpus": os.cpu_count(), "episodes": args.episodes, "max_steps": args.max_steps, "batch": args.batch}
    for workers in sorted({1, default_workers()}):
        t = time.perf_counter()
        frames = per_episode_frames(specs, workers)
        before = frames / (time.perf_counter() - t)
        t = time.perf_counter()
        frames = evaluate(args.agent, args.episodes, seed=0, workers=workers, max_steps=args.max_steps,
                          batch=args.batch, progress=False)["frames"]
        after = frames / (time.perf_counter() - t)
        print(f"{workers} worker(s), {frames} frames: one at a time {before:.0f} frames/s, "
              f"lockstep blocks of <= {args.batch} {after:.0f} frames/s ({after / before:.2f}x)")
        result[f"frames_per_s_{workers}_workers"] = {"before": round(before, 1), "after": round(after, 1)}
    share = agent_share(specs[:args.batch])
    for path, ms in share.items():
        print(f"{path}: per frame {ms['agent_ms']:.2f} ms in the agent, {ms['env_step_ms']:.2f} ms in env.step, "
              f"{ms['wall_ms']:.2f} ms in all (agent {ms['agent_ms'] / ms['wall_ms']:.0%} of the step)")
        result[f"ms_per_frame_{path}"] = {k: round(v, 3) for k, v in ms.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
