"""Run a command while busy-loop processes hold CPU cores: the load that CI machines and shared boxes put on a run.

    python -m tests.busy [--cores N] [--times K] -- python -m pytest

Starts N (default: every core) busy-loop processes, runs the command K times in a row (default 1) under that load,
stops the loops, and exits with the first non-zero status (or 0). Each run's wall time and status is printed to
stderr, so the figure can be quoted. A flaky test shows up here long before CI.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time


def _spin() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.busy", description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="busy-loop processes (default: all)")
    parser.add_argument("--times", type=int, default=1, help="run the command this many times in a row")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- python -m pytest")
    loops = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(args.cores)]
    for p in loops:
        p.start()
    status = 0
    try:
        for i in range(args.times):
            t0 = time.monotonic()
            rc = subprocess.call(command)
            print(f"tests.busy: run {i + 1}/{args.times} under {args.cores} busy loops: exit {rc} in "
                  f"{time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
            status = status or rc
    finally:
        for p in loops:
            p.terminate()
        for p in loops:
            p.join()
    return status


if __name__ == "__main__":
    sys.exit(main())
