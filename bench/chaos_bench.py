"""``everyprompt-bench chaos``: the chaos suite at scale, and a reliability table.

1. Codec fuzz: ``--fuzz-frames`` frames (random bytes, mutated valid frames, well-formed msgpack with wrong
   names, fields, types and versions) through ``transport.codec.decode``; each must decode to a typed message or
   raise FrameError. Anything else escaping is a failure.
2. Hostile frames: ``--hostile-per-kind`` messages of each kind in transport/hostile.py, plus replayed Hellos and
   port-scanner bytes, at a live Hub with a real peer connected; each must be counted with its reason, and the
   hub must still serve the peer. RSS growth of the hub's process is reported.
3. Stalled consumer: a producer floods a hub that stopped reading; frames accepted before pushback, RSS growth,
   and frames lost once it reads again.
4. Kills: ``--runs`` real training runs (tiny preset, ``--steps`` steps, 2 rollout workers) with up to ``--kills``
   SIGKILLs each, of random kinds (rollout worker, reward worker, learner rank, torchrun), each a random 0.3-2 s
   after the run recovered from the previous one (a run that gets near its end takes no more). Recovery time =
   from the kill until the replacement has connected to the coordinator and a new step has been trained.
5. Corrupt checkpoint: after each run its newest checkpoint is damaged (a flipped byte, a torn file, a missing
   file) and the run is resumed with more steps; it must fall back to the previous checkpoint.
6. Newer kinds (bench/chaos_faults.py), ``--fault-runs`` runs each: SIGTERM or SIGINT mid-run then
   ``resume=true``; a torn or corrupted weight version refused by a restarted worker's sha256 check; a full disk
   (a tmpfs, root only) under ``checkpoints/`` and under ``weights/``; the sglang server (the stand-in,
   tests/sglang_standin.py) answering 503, hanging and dying mid-stream.
Every run must train exactly the expected prompt ids: lost and duplicated prompts are counted per fault kind.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.chaos_faults import brief, disk_full_run, interrupt_run, newer_rows, sglang_run, torn_weights_run
from bench.chaos_faults import row as _row
from bench.chaos_run import ChaosRun
from engine.log import configure_logging

KILL_KINDS = ("rollout", "reward", "learner_rank", "torchrun")


def _fuzz(num_frames: int, seed: int) -> dict:
    from transport.codec import FrameError, decode
    from transport.hostile import fuzz_frame, valid_frames

    rng, valid = np.random.default_rng(seed), valid_frames()
    decoded = rejected = escaped = 0
    t0 = time.perf_counter()
    for _ in range(num_frames):
        try:
            decode(fuzz_frame(rng, valid), max_frame_bytes=1 << 20)
            decoded += 1
        except FrameError:
            rejected += 1
        except Exception:  # noqa: BLE001 - the failure this measures: anything but FrameError escaping
            escaped += 1
    return {"injected": num_frames, "survived": decoded + rejected, "decoded": decoded, "rejected": rejected,
            "escaped": escaped, "seconds": time.perf_counter() - t0}


async def _hostile(per_kind: int) -> dict:
    from transport import Hello, Hub, Peer, Scored
    from transport.hostile import KINDS, attack, replay_hello, rss_mb, tcp_garbage

    max_frame = 64 * 1024
    hub = Hub(heartbeat_s=0.5, max_frame_bytes=max_frame)
    await hub.start()
    peer = Peer(hub.endpoint, hello=Hello(role="rollout", worker_id=0, pid=os.getpid()), heartbeat_s=0.5)
    await peer.start()
    await hub.recv(timeout=10)  # its Hello
    rss0, kinds = rss_mb(), {}

    async def counted(reason: str | None, before: int, n: int) -> int:
        if reason is None:  # refused by ZeroMQ (MAXMSGSIZE) before any buffering: nothing to count
            return n
        deadline = time.monotonic() + 20
        while hub.rejected[reason] - before < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return hub.rejected[reason] - before

    try:
        for kind in KINDS:
            n = per_kind if kind != "beyond_max_msg_size" else max(per_kind // 20, 1)  # 128 KiB each
            before = dict(hub.rejected)
            reason = await asyncio.to_thread(attack, hub.endpoint, kind, count=n, max_frame_bytes=max_frame, seed=1)
            kinds[kind] = {"injected": n, "reason": reason, "counted": await counted(reason, before.get(reason, 0), n)}
        n = max(per_kind // 100, 1)
        kinds["replayed_hello"] = {"injected": n, "reason": "replayed", "counted": 0}
        kinds["port_scanner"] = {"injected": n, "reason": "bad_handshake", "counted": 0}
        kinds["http_request"] = {"injected": n, "reason": None, "counted": 0}  # read as ZMTP 1.0 frames, or refused
        for i in range(n):  # a peer that is gone, its Hello replayed; port-scanner bytes; an HTTP client
            ghost = Peer(hub.endpoint, hello=Hello(role="reward", worker_id=i, pid=10_000 + i), heartbeat_s=0.5)
            await ghost.start()
            await hub.recv(timeout=10)
            await ghost.close()
            hub.forget(ghost.peer_id)
            for kind, fn in (("replayed_hello", lambda i=i: replay_hello(hub.endpoint, role="reward", worker_id=i,
                                                                         pid=10_000 + i)),
                             ("port_scanner", lambda i=i: tcp_garbage(hub.endpoint, seed=i)),
                             ("http_request", lambda i=i: tcp_garbage(hub.endpoint, seed=i, zmtp_signature=False))):
                reason = kinds[kind]["reason"]
                before = hub.rejected[reason] if reason else 0
                await asyncio.to_thread(fn)
                got = min(await counted(reason, before, 1), 1)
                kinds[kind]["counted"] += got
                if not got and ghost.peer_id not in hub.peers:  # ZeroMQ refused the connection itself (the
                    kinds[kind]["refused_by_zmq"] = kinds[kind].get("refused_by_zmq", 0) + 1  # id still held)
        await peer.send(Scored(sample_key="still-there", reward=1.0, valid=True))
        serving = (await hub.recv(timeout=10))[1].sample_key == "still-there"
        return {"per_kind": kinds, "rejected": dict(hub.rejected), "serving_after": serving,
                "peers_after": len(hub.peers), "rss_growth_mb": rss_mb() - rss0}
    finally:
        await peer.close()
        await hub.close()


def _stalled(total: int) -> dict:
    from transport import Hub, run
    from transport.hostile import flood_producer, rss_mb

    async def main():
        hub = Hub(hwm=50, max_frame_bytes=1 << 20, heartbeat_s=0.5)
        await hub.start()
        sent, blocked, resume = [], threading.Event(), threading.Event()
        rss0 = rss_mb()
        t = threading.Thread(target=flood_producer, args=(hub.endpoint, total, 50, sent, blocked, resume), daemon=True)
        t.start()
        try:
            await asyncio.to_thread(blocked.wait, 60)
            await asyncio.sleep(1.0)
            accepted, growth = len(sent), rss_mb() - rss0
            resume.set()
            await hub.recv(timeout=10)  # Hello
            got = []
            while len(got) < total:
                got.append((await hub.recv(timeout=60))[1].prompt_id)
            return {"injected": 1, "survived": int(got == list(range(total))), "frames": total,
                    "accepted_before_pushback": accepted, "rss_growth_mb": growth,
                    "lost": total - len(set(got)), "duplicated": len(got) - len(set(got))}
        finally:
            resume.set()
            await asyncio.to_thread(t.join, 30)
            await hub.close()

    return run(main())


def _kill_run(out: Path, sft_cache: Path, steps: int, kills: int, rng: random.Random) -> dict:
    """One run with ``kills`` SIGKILLs at random steps; then its newest checkpoint corrupted and resumed."""
    common = ["rollout.num_workers=2", "train.checkpoint_every=4", "transport.peer_timeout_s=8",
              f"transport.max_actor_restarts={kills + 2}", f"transport.max_learner_restarts={kills + 2}"]
    run = ChaosRun(out, steps=steps, overrides=common, sft_cache=sft_cache)
    events = []
    run.start()
    try:
        events = run.random_kills([rng.choice(KILL_KINDS) for _ in range(kills)], rng)
        summary = run.finish()
        ledger = run.ledger()
    except AssertionError as e:
        run.stop()
        return {"events": events, "failed": str(e)[:2000], "ledger": run.ledger()}
    # a disk fault in the newest checkpoint, then resume=true with more steps
    root = run.run_dir / "checkpoints"
    newest = max(root.glob("step_*"))
    files = sorted(p for p in newest.rglob("*") if p.suffix in (".pt", ".npz", ".safetensors", ".json")
                   and p.name != "meta.json")  # model, optimizer, RNG, weights, coordinator state
    victim, fault = rng.choice(files), rng.choice(["flip", "truncate", "delete"])
    if fault == "delete":
        victim.unlink()
    elif fault == "truncate":
        victim.write_bytes(victim.read_bytes()[: max(len(victim.read_bytes()) // 2, 0)])
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    resumed = ChaosRun(out, steps=steps + 8, overrides=common, sft_cache=sft_cache)
    t0 = time.monotonic()
    resumed.start("resume=true")
    try:
        resumed.wait_steps(steps + 1)
        resume_s = time.monotonic() - t0
        summary2 = resumed.finish()
        fell_back = summary2["resumed_from_step"] < int(newest.name.split("_")[1]) and \
            "checkpoint.corrupt" in resumed.stderr()
        corrupt = {"fault": f"{fault} {victim.relative_to(newest)}", "fell_back": fell_back,
                   "resumed_from_step": summary2["resumed_from_step"], "recovery_s": resume_s,
                   "ledger": resumed.ledger()}
    except AssertionError as e:
        resumed.stop()
        corrupt = {"fault": f"{fault} {victim.relative_to(newest)}", "fell_back": False, "failed": str(e)[:2000],
                   "ledger": resumed.ledger()}
    return {"events": events, "summary": summary, "ledger": ledger, "corrupt": corrupt}


def main(argv: list[str]) -> dict:
    from bench.common import print_table
    from transport import run as run_async

    p = argparse.ArgumentParser(prog="everyprompt-bench chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fuzz-frames", type=int, default=100_000, help="mutated codec frames to decode")
    p.add_argument("--hostile-per-kind", type=int, default=2_000, help="hostile frames of each kind sent to a hub")
    p.add_argument("--flood-frames", type=int, default=5_000, help="64 KiB frames at a stalled consumer")
    p.add_argument("--runs", type=int, default=3, help="training runs with kills (each also gets a corrupt "
                   "checkpoint and a resume)")
    p.add_argument("--kills", type=int, default=8, help="SIGKILLs per run")
    p.add_argument("--steps", type=int, default=400, help="steps per run (tiny preset; about 0.1 s each here)")
    p.add_argument("--fault-runs", type=int, default=1, help="runs of each newer fault kind: SIGTERM/SIGINT then "
                   "resume, a torn weight version, a full disk under checkpoints/ and weights/ (needs root)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fuzzing and of the kill times")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    a = p.parse_args(argv)
    configure_logging(role="bench", level=logging.ERROR)  # thousands of frames are rejected on purpose
    rng, t_all = random.Random(a.seed), time.monotonic()

    fuzz = _fuzz(a.fuzz_frames, a.seed)
    print(f"fuzz: {fuzz}", flush=True)
    hostile = run_async(_hostile(a.hostile_per_kind))
    print(f"hostile: {hostile}", flush=True)
    stalled = _stalled(a.flood_frames)
    print(f"stalled consumer: {stalled}", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="everyprompt-chaos-") as tmp:
        root = Path(a.out or tmp)
        for i in range(a.runs):
            r = _kill_run(root / f"run{i}", root / "sft_cache", a.steps, a.kills, rng)
            runs.append(r)
            print(f"run {i}: kills {[(e['kind'], e['at_step'], round(e['recovery_s'], 1)) for e in r['events']]} "
                  f"ledger {r['ledger']} corrupt {r.get('corrupt', {}).get('fault')} -> "
                  f"{r.get('corrupt', {}).get('ledger')}", flush=True)
        newer = {"interrupt": [], "weights": [], "disk": [], "sglang": []}
        for i in range(a.fault_runs):
            newer["interrupt"].append(interrupt_run(root / f"interrupt{i}", root / "sft_cache", rng))
            newer["weights"].append(torn_weights_run(root / f"weights{i}", root / "sft_cache", rng))
            newer["disk"].append(disk_full_run(root / f"disk{i}", root / "sft_cache"))
            newer["sglang"].append(sglang_run(root / f"sglang{i}", root / "sft_cache"))
            print(f"fault run {i}: " + "; ".join(f"{k}: {brief(v[-1])}" for k, v in newer.items()), flush=True)

    rows = [_row("codec fuzz frame", fuzz["injected"], fuzz["survived"], 0, 0, [])]
    for kind, k in hostile["per_kind"].items():  # survived = counted with its reason, and the hub still serves
        kept_out = k["counted"] + k.get("refused_by_zmq", 0)
        rows.append(_row(f"frame: {kind}", k["injected"], kept_out if hostile["serving_after"] else 0, 0, 0, []))
    rows.append(_row("stalled consumer", 1, stalled["survived"], stalled["lost"], stalled["duplicated"], []))
    for kind in KILL_KINDS:
        ev = [(r, e) for r in runs for e in r["events"] if e["kind"] == kind]
        involved = [r for r in runs if any(e["kind"] == kind for e in r["events"])]
        ok = sum(1 for r, _ in ev if "failed" not in r)
        rows.append(_row(f"SIGKILL {kind}", len(ev), ok, sum(r["ledger"]["lost"] for r in involved),
                         sum(r["ledger"]["duplicated"] for r in involved), [e["recovery_s"] for _, e in ev]))
    cor = [r["corrupt"] for r in runs if "corrupt" in r]
    rows.append(_row("corrupt checkpoint", len(cor), sum(c["fell_back"] for c in cor),
                     sum(c["ledger"]["lost"] for c in cor), sum(c["ledger"]["duplicated"] for c in cor),
                     [c["recovery_s"] for c in cor if "recovery_s" in c]))
    rows += newer_rows(newer)
    print()
    print_table(["fault", "injected", "survived", "prompts lost", "prompts duplicated", "max recovery s",
                 "mean recovery s"],
                [[r["fault"], r["injected"], r["survived"], r["prompts_lost"], r["prompts_duplicated"],
                  "-" if r["max_recovery_s"] is None else r["max_recovery_s"],
                  "-" if r["mean_recovery_s"] is None else r["mean_recovery_s"]] for r in rows])
    print(f"hostile frames counted by reason: {hostile['rejected']}; peers after: {hostile['peers_after']}; "
          f"hub RSS growth {hostile['rss_growth_mb']:.1f} MiB; stalled consumer: "
          f"{stalled['accepted_before_pushback']} of {stalled['frames']} frames accepted before pushback, RSS growth "
          f"{stalled['rss_growth_mb']:.1f} MiB; codec escapes {fuzz['escaped']}; wall {time.monotonic() - t_all:.0f} s")
    totals = {"faults_injected": sum(r["injected"] for r in rows), "faults_survived": sum(r["survived"] for r in rows),
              "prompts_lost": sum(r["prompts_lost"] for r in rows),
              "prompts_duplicated": sum(r["prompts_duplicated"] for r in rows),
              "kills": sum(len(r["events"]) for r in runs), "wall_s": time.monotonic() - t_all}
    return {"config": vars(a), "metrics": {"table": rows, "totals": totals, "fuzz": fuzz, "hostile": hostile,
                                           "stalled": stalled, "runs": runs, "fault_runs": newer}}

