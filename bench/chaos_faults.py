"""The newer fault kinds of ``everyprompt-bench chaos`` (bench/chaos_bench.py), each on a real training run
(bench/chaos_run.py's ChaosRun) with the fault really injected and every trained prompt id counted:

- SIGTERM or SIGINT mid-run, then ``resume=true`` (the interrupt checkpoint, docs/guides/reliability.md);
- a torn or corrupted weight version that a restarted rollout worker must refuse by its sha256, then load whole;
- a full disk (a small tmpfs, so it needs root) under ``checkpoints/`` (the checkpoint is dropped, training goes
  on, a later one is saved, a learner kill rolls back to an intact one) and under ``weights/`` (the run stops
  cleanly, exit 1, and ``resume=true`` continues);
- the sglang backend's server (tests/sglang_standin.py, launched as ``python -m sglang.launch_server``) answering
  503, hanging with its sockets open, and dying mid-stream.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.chaos_run import ChaosRun


def _partial_ledger(run: ChaosRun) -> dict:
    """The ledger of the steps a failed run did train (its lost/duplicated prompts among them)."""
    return ChaosRun(run.out_dir, steps=len(run.step_rows()), groups_per_step=run.groups_per_step).ledger()


def _fault_common(restarts: int = 4) -> list[str]:
    return ["rollout.num_workers=2", "train.checkpoint_every=4", f"transport.max_actor_restarts={restarts}",
            f"transport.max_learner_restarts={restarts}"]


def interrupt_run(out: Path, sft_cache: Path, rng: random.Random) -> dict:
    """SIGTERM or SIGINT mid-run: the last completed step is checkpointed (exit 128 + signal); ``resume=true``
    then trains every prompt exactly once across both attempts."""
    sig = rng.choice([signal.SIGTERM, signal.SIGINT])
    run = ChaosRun(out, steps=100_000, overrides=[*_fault_common(), "transport.peer_timeout_s=8"],
                   sft_cache=sft_cache)
    run.start()
    try:
        run.wait_steps(rng.randint(3, 8))
        info = run.interrupt(sig)
    except AssertionError as e:
        run.stop()
        return {"fault": sig.name, "survived": False, "failed": str(e)[:2000], "ledger": _partial_ledger(run)}
    finally:
        run.stop()
    if info["rc"] != 128 + sig or not info["checkpoint_step"]:
        return {"fault": sig.name, "survived": False, "interrupt": info, "ledger": _partial_ledger(run)}
    res = run.resume_exactly_once(info["checkpoint_step"], more_steps=2)
    return {"fault": sig.name, "interrupt": info, **res, "survived": "failed" not in res and
            res.get("resumed_from_step") == info["checkpoint_step"]}


def _log_count(run: ChaosRun, *events: str) -> int:
    text = "".join(p.read_text(errors="replace") for p in (run.run_dir / "logs").rglob("*.log"))
    return sum(text.count(e) for e in events)


def torn_weights_run(out: Path, sft_cache: Path, rng: random.Random) -> dict:
    """The newest weight version torn (truncated) or corrupted (a flipped byte) while the learner is stopped, then
    a rollout worker killed: its replacement loads that version first, must refuse it by its sha256 (or as
    unparseable), and loads it once the file is whole again. No prompt may be lost or trained twice."""
    fault, newest = rng.choice(["flip", "truncate"]), Path("policy_v?.safetensors")
    run = ChaosRun(out, steps=24, overrides=[*_fault_common(), "transport.peer_timeout_s=90"], sft_cache=sft_cache)
    run.start()
    detected, recovery = False, None
    try:
        run.wait_steps(3)
        ranks = run.pids("learner_rank")
        for pid in ranks:  # no new version while the file is torn (peer_timeout_s=90 covers the pause)
            os.kill(pid, signal.SIGSTOP)
        try:
            newest = max((run.run_dir / "weights").glob("policy_v*.safetensors"),
                         key=lambda q: int(q.stem.removeprefix("policy_v")))
            good = newest.read_bytes()
            bad = bytearray(good[: len(good) // 2]) if fault == "truncate" else bytearray(good)
            if fault == "flip":
                bad[-1] ^= 0xFF  # tensor bytes: safetensors still parses it; only the digest can tell
            before = _log_count(run, "weights.digest_mismatch", "weights.unparseable")
            newest.write_bytes(bytes(bad))
            pid, t_kill = run.kill("rollout")
            run.wait(lambda: _log_count(run, "weights.digest_mismatch", "weights.unparseable") > before, 180,
                     "the restarted rollout worker refusing the damaged weights")
            detected = True
            newest.write_bytes(good)  # whole again: the worker's next attempt (or its 30 s retry) loads it
        finally:
            for p_ in ranks:
                os.kill(p_, signal.SIGCONT)
        recovery = run.wait_recovered("rollout", pid, t_kill)
        run.finish()
    except AssertionError as e:
        run.stop()
        return {"fault": f"{fault} {newest.name}", "survived": False, "failed": str(e)[:2000],
                "ledger": _partial_ledger(run)}
    return {"fault": f"{fault} {newest.name}", "survived": detected, "recovery_s": recovery,
            "refusals_logged": _log_count(run, "weights.digest_mismatch", "weights.unparseable"),
            "ledger": run.ledger()}


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """A small tmpfs at ``path`` (a disk that really fills up); the reason when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    return None if proc.returncode == 0 else f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}"


def _fill(path: Path) -> Path:
    """Write zeros into ``path/filler`` until the disk is full (ENOSPC)."""
    filler, chunk = path / "filler", bytes(64 * 1024)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


def disk_full_run(out: Path, sft_cache: Path) -> dict:
    """checkpoints/ and weights/ each on a small tmpfs. (1) checkpoints/ filled up: a checkpoint fails
    (``checkpoint.write_failed``), training goes on; space freed, a later one is saved; a learner rank killed then
    rolls back to the newest checkpoint (which must be intact). (2) weights/ filled up: the version is retried,
    then the run stops cleanly (exit 1); space freed, ``resume=true`` trains every prompt exactly once."""
    run = ChaosRun(out, steps=100_000, overrides=[*_fault_common(), "transport.peer_timeout_s=8"], sft_cache=sft_cache)
    ckpt, weights = run.run_dir / "checkpoints", run.run_dir / "weights"
    why = _mount_tmpfs(ckpt, "32m") or _mount_tmpfs(weights, "16m")
    if why:
        subprocess.run(["umount", "-l", str(ckpt)], capture_output=True)
        return {"skipped": why}
    out_ = {"checkpoint": {"survived": False}, "weights": {"survived": False}}
    try:
        run.start()
        run.wait_steps(5)
        filler = _fill(ckpt)
        t0, n = time.monotonic(), run.stderr().count("checkpoint.write_failed")
        run.wait(lambda: run.stderr().count("checkpoint.write_failed") > n, 120, "a checkpoint failing on a full disk")
        failed_at = len(run.step_rows())
        filler.unlink()
        run.wait(lambda: any(int(q.name.split("_")[1]) > failed_at for q in ckpt.glob("step_*")), 120,
                 "a checkpoint saved once there is room")
        pid, t_kill = run.kill("learner_rank")  # the rollback loads the newest checkpoint
        out_["checkpoint"] = {"survived": True, "recovery_s": run.wait_recovered("learner_rank", pid, t_kill),
                              "free_s": time.monotonic() - t0}
        filler = _fill(weights)
        try:
            run.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError("the run did not stop after its weight version could not be written") from None
        stopped = run.proc.returncode == 1 and _log_count(run, "weights.write_failed") > 0  # the learner's log
        filler.unlink()
        run._out.close()
        run._err.close()
        for name in ("stdout.txt", "stderr.txt"):  # the resume writes its own
            (run.out_dir / name).replace(run.out_dir / f"stopped-{name}")
        res = run.resume_exactly_once(len(run.step_rows()), more_steps=2)
        out_["weights"] = {"survived": stopped and "failed" not in res, "rc": run.proc.returncode, **res}
        out_["ledger"] = res["ledger"]
    except AssertionError as e:
        run.stop()
        out_["failed"] = str(e)[:2000]
        out_["ledger"] = _partial_ledger(run)
    finally:
        run.stop()
        for m in (weights, ckpt):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
    return out_


SGLANG_FAULTS = (  # (name, the stand-in's fault modes, the rollout worker's log event that shows the recovery)
    ("HTTP 503", {"status": 503, "status_count": 3}, "sglang.recovered"),
    ("hung", {"hang_after_tokens": 3}, "sglang.relaunched"),
    ("killed", {"die_after_tokens": 3}, "sglang.relaunched"))


def free_port_pair() -> int:
    """A port p with p and p + 1 free on loopback (worker i's server listens on rollout.sglang_port + i)."""
    import socket

    for _ in range(50):
        with socket.socket() as s1, socket.socket() as s2:
            s1.bind(("127.0.0.1", 0))
            port = s1.getsockname()[1]
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports on loopback")


def sglang_run(out: Path, sft_cache: Path) -> dict:
    """The sglang backend, each of 2 workers launching its own server (tests/sglang_standin.py as
    ``python -m sglang.launch_server``: sglang cannot run here). Worker 0's server answers 503 three times, then
    hangs with its sockets open, then dies mid-stream (``POST /_fault``); after each, the worker must log its
    recovery and the run train on. Every prompt exactly once at the end."""
    import http.client
    import json as json_
    import urllib.request

    repo = str(Path(__file__).resolve().parents[1])  # the stand-in is the test suite's (tests/ of this checkout)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        from tests.sglang_standin import fake_sglang_env
    except ImportError as e:
        return {"skipped": f"no sglang stand-in (tests/sglang_standin.py) in this checkout: {e}"}

    port = free_port_pair()
    overrides = [*_fault_common(restarts=6), "rollout.backend=sglang", f"rollout.sglang_python={sys.executable}",
                 f"rollout.sglang_port={port}", "rollout.chunk_tokens=1", "rollout.return_routes=false",
                 "learner.router_replay=off", "rollout.sglang_health_interval_s=0.5",
                 "rollout.sglang_idle_timeout_s=3", "transport.peer_timeout_s=30"]
    run = ChaosRun(out, steps=40, overrides=overrides, sft_cache=sft_cache, env=fake_sglang_env(out))
    events = []
    run.start()
    try:
        run.wait_steps(2)
        for name, modes, evidence in SGLANG_FAULTS:
            before, steps = _log_count(run, evidence), len(run.step_rows())
            req = urllib.request.Request(f"http://127.0.0.1:{port}/_fault", data=json_.dumps(modes).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
            try:  # the stand-in sets the fault before it answers; a reply cut short by the fault itself is fine
                urllib.request.urlopen(req, timeout=30).read()
            except (http.client.HTTPException, ConnectionError):
                pass
            t0 = time.monotonic()
            run.wait(lambda: _log_count(run, evidence) > before and len(run.step_rows()) > steps + 1, 300,
                     f"recovery from the sglang server {name}")
            events.append({"fault": name, "recovery_s": time.monotonic() - t0, "at_step": steps})
        run.finish()
    except (AssertionError, OSError) as e:
        return {"events": events, "failed": str(e)[:2000], "ledger": _partial_ledger(run)}
    finally:
        run.stop()
    return {"events": events, "ledger": run.ledger()}


def brief(r: dict) -> str:
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    ok = r.get("survived", r.get("weights", {}).get("survived", "failed" not in r))  # sglang: no failure
    return f"{'survived' if ok else 'FAILED'} " \
        f"{r.get('fault', '')} ledger {r.get('ledger')}" + (f" failed: {r['failed'][:300]}" if "failed" in r else "")


def newer_rows(newer: dict) -> list[dict]:
    """One row per newer fault kind: injected, survived, prompts lost / duplicated from each run's ledger."""
    out = []
    for name, key in (("SIGTERM/SIGINT, then resume", "interrupt"), ("torn or corrupt weight version", "weights")):
        rs = newer[key]
        out.append(row(name, len(rs), sum(bool(r["survived"]) for r in rs), sum(r["ledger"]["lost"] for r in rs),
                        sum(r["ledger"]["duplicated"] for r in rs), [r["recovery_s"] for r in rs if r.get("recovery_s")]))
    disk = [r for r in newer["disk"] if "skipped" not in r]
    for name, key in (("disk full: checkpoint", "checkpoint"), ("disk full: weight version", "weights")):
        out.append(row(name, len(disk), sum(bool(r[key]["survived"]) for r in disk),
                        sum(r["ledger"]["lost"] for r in disk), sum(r["ledger"]["duplicated"] for r in disk),
                        [r[key]["recovery_s"] for r in disk if r[key].get("recovery_s")]))
    rs = [r for r in newer["sglang"] if "skipped" not in r]
    for name, _, _ in SGLANG_FAULTS:
        ev = [(r, e) for r in rs for e in r["events"] if e["fault"] == name]
        out.append(row(f"sglang server {name}", len(rs), sum(1 for r, _ in ev if "failed" not in r),
                        sum(r["ledger"]["lost"] for r in rs), sum(r["ledger"]["duplicated"] for r in rs),
                        [e["recovery_s"] for _, e in ev]))
    return out


def row(kind: str, injected: int, survived: int, lost: int, dup: int, rec: list[float]) -> dict:
    return {"fault": kind, "injected": injected, "survived": survived, "prompts_lost": lost,
            "prompts_duplicated": dup, "max_recovery_s": max(rec) if rec else None,
            "mean_recovery_s": float(np.mean(rec)) if rec else None}
