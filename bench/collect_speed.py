"""Collection throughput: environment frames per second with 1 worker and with all workers.

    uv run python bench/collect_speed.py [--episodes 4] [--max-steps 300] [--policy brownian] [--stock]

Prints one line per worker count and a final JSON line.
"""

import argparse
import json
import os
import tempfile
import time

from wmlib.rollouts import collect, default_workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--policy", default="brownian")
    parser.add_argument("--stock", action="store_true", help="stock Gymnasium renderer instead of the fast one")
    args = parser.parse_args()
    result = {"cpus": os.cpu_count(), "policy": args.policy, "fast_env": not args.stock}
    for workers in sorted({1, default_workers()}):
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            manifest = collect(args.policy, args.episodes, out, workers=workers, max_steps=args.max_steps,
                               fast=not args.stock, progress=False)
            seconds = time.perf_counter() - t
        fps = manifest["frames"] / seconds
        print(f"{workers} worker(s): {manifest['frames']} frames in {seconds:.1f} s = {fps:.0f} frames/s")
        result[f"frames_per_s_{workers}_workers"] = round(fps, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
