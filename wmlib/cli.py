"""The `wm` command: the stages of World Models for long runs.

    wm collect --policy brownian --episodes 8      real driving data (notebook 01)

Every subcommand prints one clear line and exits non-zero on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def cmd_collect(args) -> None:
    from wmlib.policies import POLICIES
    from wmlib.rollouts import collect

    if args.policy not in POLICIES:
        raise ValueError(f"unknown policy {args.policy!r}; valid policies: {', '.join(POLICIES)}")
    kwargs = {"agent": args.agent} if args.agent else {}
    manifest = collect(args.policy, args.episodes, args.out, seed=args.seed, workers=args.workers,
                       max_steps=args.max_steps, mirror=args.mirror, fast=not args.stock, policy_kwargs=kwargs)
    print(json.dumps({"out": str(args.out), "episodes": len(manifest["episodes"]), "frames": manifest["frames"]}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wm", description="World Models (Ha & Schmidhuber, 2018) on CarRacing-v3")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="drive real CarRacing-v3 episodes with a policy and save them")
    p.add_argument("--policy", default="brownian", help="random, brownian, heuristic, recovery or controller")
    p.add_argument("--episodes", type=_positive_int, default=8)
    p.add_argument("--max-steps", type=_positive_int, default=1000)
    p.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="episode i runs on env seed SEED+i")
    p.add_argument("--out", default="runs/data", help="collection folder (created; re-running resumes)")
    p.add_argument("--mirror", action="store_true", help="also save each episode's left-right mirror image")
    p.add_argument("--stock", action="store_true", help="use the stock Gymnasium renderer, not the fast one")
    p.add_argument("--agent", default=None, help="agent folder (V, M, C checkpoints) for --policy controller")
    p.set_defaults(func=cmd_collect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"wm {args.command}: interrupted; finished work is saved, run the same command to resume",
              file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"wm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
