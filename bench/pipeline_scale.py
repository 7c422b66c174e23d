"""``everyprompt-bench pipeline --scale 64,256,1024``: the coordinator at cluster scale.

Per size N, one async setting on the simulated backend (engine/backends/sim.py): N real ``RolloutWorker`` actors,
each with its own ZeroMQ DEALER socket on loopback to the coordinator's ROUTER, hosted ``ceil(N / --scale-processes)``
per process on one event loop (no torch), real reward workers and the simulated learner. The load per worker is the
same at every size (``--scale-groups-per-worker`` groups per worker per step), so a coordinator that keeps up
trains N times the tokens per second of one worker.

Per size: trained tokens/s and per worker, scaling efficiency (tokens/s per worker / the smallest size's), the
coordinator's event-loop lag p99 (a 20 ms sleep, how late it wakes), the frames it handled per second (messages it
received from the hub plus those it sent; heartbeats are inside the hub and not counted), its CPU share
(``time.process_time`` of the coordinator process, all its threads, / wall: 1.0 = one core), its CPU per frame, and
the whole machine's CPU share (/proc/stat). ``saturates_at`` is the first size whose efficiency falls under
``--scale-efficiency``, with what was busy there (``bound``: the coordinator's core, or the whole machine). From the
smallest size's frames per worker and the coordinator's CPU per frame, ``coordinator_limit_workers`` is the worker
count at which the coordinator alone would fill one core (at this time scale, and at ``sim.time_scale=1``, where each
worker sends ``--time-scale`` times more frames per second).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import sys
from pathlib import Path


def run_scale(a: argparse.Namespace, run_setting) -> dict:
    """One async setting per size; ``run_setting(a, name, mode)`` runs one."""
    from bench.common import print_table

    requested = [int(x) for x in a.scale.split(",") if x]
    room = _max_peers() - a.reward_workers - 1  # the hub's peer cap, less the reward workers and the learner
    sizes = [min(n, room) for n in requested]
    for want, n in zip(requested, sizes):
        if n < want:
            print(f"{want} workers do not fit under the coordinator hub's cap of {_max_peers()} peers "
                  f"(transport/channels.py Hub max_peers, with {a.reward_workers} reward workers and the learner): "
                  f"running {n}", file=sys.stderr, flush=True)
    rows = {}
    for n in sizes:
        b = copy.copy(a)
        b.backend, b.workers = "sim", n
        b.groups_per_step = max(1, round(n * a.scale_groups_per_worker))
        b.out_dir = str(Path(a.out_dir) / f"scale-{n}")
        b.overrides = [f"sim.workers_per_process={math.ceil(n / a.scale_processes)}", *a.overrides]
        r = run_setting(b, "async", "async")
        r.update(workers=n, groups_per_step=b.groups_per_step, processes=math.ceil(n / math.ceil(n / a.scale_processes)),
                 tokens_per_s_per_worker=r["tokens_per_s"] / n, frames_per_s_per_worker=r["frames_per_s"] / n)
        rows[n] = r
    first = rows[sizes[0]]
    for r in rows.values():
        r["scaling_efficiency"] = r["tokens_per_s_per_worker"] / first["tokens_per_s_per_worker"]
    print_table(["workers", "procs", "tokens/s", "per worker", "efficiency", "of ideal", "rollout idle", "lag p99 ms",
                 "frames/s", "coord cpu", "us/frame", "box cpu", "load 1m"],
                [[n, r["processes"], r["tokens_per_s"], r["tokens_per_s_per_worker"], r["scaling_efficiency"],
                  r["fraction_of_ideal"], r["rollout_idle_frac"], r["coordinator_lag_ms_p99"], r["frames_per_s"],
                  r["coordinator_cpu_frac"], r["coordinator_cpu_us_per_frame"], r["box_cpu_frac"], r["load_avg_1m"]]
                 for n, r in rows.items()])
    saturated = next((n for n in sizes if rows[n]["scaling_efficiency"] < a.scale_efficiency), None)
    us_per_frame = max(r["coordinator_cpu_us_per_frame"] for r in rows.values())  # the costliest size: conservative
    capacity = 1e6 / us_per_frame  # frames per second one core of coordinator handles at that cost
    limit = capacity / first["frames_per_s_per_worker"]
    out = {"config": vars(a), "scale": {str(n): r for n, r in rows.items()}, "requested_sizes": requested,
           "hub_max_peers": _max_peers(), "saturates_at": saturated,
           "bound": _bound(rows[saturated], a.scale_busy) if saturated is not None else "none",
           "coordinator_frames_per_s_capacity": capacity, "coordinator_limit_workers": limit,
           "coordinator_limit_workers_real_time": limit / a.time_scale}
    print(f"saturates at: {saturated} workers (bound: {out['bound']}); the coordinator fills one core at "
          f"~{capacity:.0f} frames/s = ~{limit:.0f} workers at --time-scale {a.time_scale:g} "
          f"(~{out['coordinator_limit_workers_real_time']:.0f} at real time)")
    return out


def _max_peers() -> int:
    """The coordinator hub's cap on joined peers (its constructor's default; start_actors does not change it)."""
    from transport.channels import Hub

    return inspect.signature(Hub.__init__).parameters["max_peers"].default


def _bound(r: dict, busy: float) -> str:
    if r["coordinator_cpu_frac"] >= busy:
        return "coordinator (its one core)"
    if r["box_cpu_frac"] >= busy:
        return "machine (every core busy)"
    return "neither core busy"
