"""Run untrusted Python (model-written code and its unit tests) in a contained child process.

``run_python`` starts ``python -I -S`` with a small bootstrap that, before any user code runs:
- gets a private working directory (``cwd``, ``HOME`` and ``TMPDIR``), removed afterwards;
- sets resource limits: CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE, stdout and
  stderr included), process count (RLIMIT_NPROC), open files, no core dumps; and ``nice`` 19;
- leaves the network: a fresh network namespace (``unshare(CLONE_NEWNET)``: no interface is up, every connect
  fails), or, where that is not permitted, an audit hook that refuses every socket (``network: "audit"``);
- when started as root, drops to a dedicated unprivileged uid (``run_python(uid=...)``, by default 61000 +
  pid % 4000, so concurrent sandboxes of different processes do not share an RLIMIT_NPROC count) with no
  supplementary groups and ``no_new_privs``;
- installs an audit hook that refuses writes, renames, removals and links outside the private directory,
  ``exec``/``system``/``posix_spawn`` (an exec'd program would shed the hook) and ``ctypes``.

The parent enforces a wall-clock limit: the child runs in its own session, and on timeout and at the end its whole
process group is killed; when a uid was dropped to, every process still owned by that uid is killed too (which
catches a child that called ``setsid``). ``SandboxResult.isolation`` says which of these were active.

Strength, honestly: this contains accidents and the usual reward hacks of RL policies (infinite loops, memory and
fork bombs, network calls, writes outside the directory, ``exit(0)`` before the tests run). It is not a security
boundary like gVisor, nsjail or a VM: it shares the kernel, the audit hook lives in the same interpreter as the
code it polices (introspection can reach it), and without root there is no uid drop. Run untrusted code from
outside your own training on a real sandbox.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from configs.schema import SandboxConfig


@dataclass
class SandboxResult:
    status: str  # "ok" | "error" (non-zero exit) | "timeout" (wall or CPU) | "memory_limit" | "output_limit" | "killed"
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: dict = field(default_factory=dict)  # network: netns|audit, uid: <int>|none, audit_hook: bool, ...
    reports: list[dict] = field(default_factory=list)  # lines from the test harness (tests mode)


# Imported before privileges are dropped when the interpreter's files are not readable by the sandbox uid (e.g.
# a Python under /root): code in the sandbox can then import these and nothing else from the standard library.
PRELOAD = ("array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
           "fractions", "functools", "heapq", "io", "itertools", "json", "math", "operator", "random", "re",
           "encodings.idna", "socket", "statistics", "string", "struct", "textwrap", "time", "typing")

_lock = threading.Lock()  # one sandbox at a time per process: they share a uid (and its process count)


def default_uid() -> int:
    return 61000 + os.getpid() % 4000


def run_python(code: str, *, tests: list[str] | None = None, limits: SandboxConfig | None = None,
               uid: int | None = None, max_output_bytes: int = 64 * 1024) -> SandboxResult:
    """Run ``code`` (as module ``solution``) in the sandbox under ``limits`` (``reward.sandbox``; None = its
    defaults). With ``tests`` (Python statements, e.g. asserts), each runs after the code, in a copy of its
    namespace; one report per test says whether it passed. A test that never reports (the run died or timed out
    first) did not pass. ``uid``: the uid to drop to when root (None = 61000 + pid % 4000); ``max_output_bytes``:
    stdout/stderr kept in the result."""
    limits = limits or SandboxConfig()
    with _lock, tempfile.TemporaryDirectory(prefix="everyprompt-sandbox-") as outer:
        outer_path = Path(outer)
        os.chmod(outer, 0o711)  # traversable by the sandbox uid; its own files stay unreadable to it
        work = outer_path / "work"
        work.mkdir(mode=0o700)
        root = os.geteuid() == 0
        uid = (uid if uid is not None else default_uid()) if root else None
        if uid is not None:
            os.chown(work, uid, uid)
        nonce = secrets.token_hex(8)
        files = {name: open(outer_path / name, "w+b") for name in ("stdout", "stderr", "report")}
        try:
            return _run(code, tests, limits, work, uid, nonce, files, max_output_bytes)
        finally:
            for f in files.values():
                f.close()


def _run(code, tests, limits: SandboxConfig, work: Path, uid, nonce: str, files, max_output: int) -> SandboxResult:
    report_fd = files["report"].fileno()
    nproc = limits.max_processes if uid is not None else _own_process_count() + limits.max_processes
    cfg = {"code": code, "tests": tests, "nonce": nonce, "report_fd": report_fd, "work": str(work), "uid": uid,
           "cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb << 20, "nproc": nproc,
           "fsize": limits.max_file_mb << 20, "network": limits.network,
           "preload": [] if uid is None or _stdlib_readable_by_others() else list(PRELOAD)}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOTSTRAP], stdin=subprocess.PIPE,
                            stdout=files["stdout"], stderr=files["stderr"], cwd=work, env=env,
                            pass_fds=(report_fd,), start_new_session=True, close_fds=True)
    timed_out = False
    try:
        proc.stdin.write(json.dumps(cfg).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        proc.wait(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_all(proc.pid, uid)
    proc.wait()
    wall = time.monotonic() - t0
    stdout, stderr = (_read(files[n], max_output) for n in ("stdout", "stderr"))
    reports, isolation = [], {}
    for line in _read(files["report"], 1 << 20).splitlines():
        if line.startswith(nonce):
            rec = json.loads(line[len(nonce):])
            if "isolation" in rec:
                isolation = rec["isolation"]
            else:
                reports.append(rec)
    return SandboxResult(status=_status(proc.returncode, timed_out, stderr), returncode=proc.returncode,
                         stdout=stdout, stderr=stderr, wall_s=wall, isolation=isolation, reports=reports)


def _status(rc: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):  # SIGKILL: the CPU hard limit or our wall kill
        return "timeout"
    if rc == -signal.SIGXFSZ:
        return "output_limit"
    if rc is not None and rc < 0:
        return "killed"
    if rc != 0 and "MemoryError" in stderr:
        return "memory_limit"
    return "ok" if rc == 0 else "error"


def _read(f, limit: int) -> str:
    f.flush()
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _kill_all(pgid: int, uid: int | None) -> None:
    """Kill the sandbox's process group and, when it ran under its own uid, every process of that uid."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(20):  # a fork bomb may still be forking between two sweeps
        pids = _pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _pids_of_uid(uid: int) -> list[int]:
    """Live (not zombie: those are dead, waiting for init to reap them) processes whose real uid is ``uid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                out.append(int(d))
        except (OSError, ValueError, KeyError):
            continue
    return out


@functools.cache
def _stdlib_readable_by_others() -> bool:
    """Can any uid import the standard library (every parent directory traversable by others)?"""
    path = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents]) and bool(path.stat().st_mode & 0o004)


def _own_process_count() -> int:
    return len(_pids_of_uid(os.getuid()))


# The child's first code. It runs as whoever started it, sets every limit, drops privileges, then runs the user's
# code. Reports go to an inherited file descriptor, each line prefixed with a nonce the user's code is not given.
_BOOTSTRAP = r'''
def _setup():
    import ctypes, json, os, resource, sys
    cfg = json.loads(sys.stdin.buffer.read())
    for name in cfg["preload"]:  # the sandbox uid may not be able to read the standard library later
        __import__(name)
    fd = os.open(os.devnull, os.O_RDONLY); os.dup2(fd, 0); os.close(fd)
    iso = {}
    libc = ctypes.CDLL(None, use_errno=True)
    iso["network"] = "audit"
    if cfg["network"] == "auto" and libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
        iso["network"] = "netns"
    os.nice(19)
    R = resource
    cpu = max(1, int(cfg["cpu_s"] + 0.999))
    for what, soft, hard in ((R.RLIMIT_CPU, cpu, cpu + 1), (R.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
                             (R.RLIMIT_FSIZE, cfg["fsize"], cfg["fsize"]), (R.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"]),
                             (R.RLIMIT_NOFILE, 64, 64), (R.RLIMIT_CORE, 0, 0)):
        R.setrlimit(what, (soft, hard))
    iso.update(cpu_s=cpu, memory_bytes=cfg["memory_bytes"], max_processes=cfg["nproc"], max_file_bytes=cfg["fsize"])
    iso["uid"] = "none"
    if cfg["uid"] is not None:
        os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
        iso["uid"] = os.getuid()
    iso["no_new_privs"] = libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    work = os.path.realpath(cfg["work"])
    block_net = iso["network"] != "netns"
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def inside(p):
        if isinstance(p, int):
            return True
        p = os.path.realpath(os.fsdecode(p))
        return p == work or p.startswith(work + os.sep)
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                   "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2}
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & W
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the private directory is not allowed: {path}")
        elif event in path_events:
            for p in args[:path_events[event]]:
                if p is not None and not inside(p):
                    raise PermissionError(f"sandbox: {event} outside the private directory is not allowed: {p}")
        elif event in ("os.exec", "os.posix_spawn", "os.system", "subprocess.Popen") or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif block_net and event.startswith("socket."):
            raise PermissionError(f"sandbox: network access is not allowed ({event})")
    sys.addaudithook(hook)
    iso["audit_hook"] = True
    iso["preloaded_modules"] = len(cfg["preload"])
    return cfg, iso
def _main(cfg, iso):
    import json, os
    globals().clear()  # nothing of the bootstrap (the nonce, the report fd) stays reachable by name
    fd, nonce, code, tests = cfg["report_fd"], cfg["nonce"], cfg["code"], cfg["tests"]
    def report(rec):
        os.write(fd, (nonce + json.dumps(rec) + "\n").encode())
    report({"isolation": iso})
    del cfg, iso
    if tests is None:
        exec(compile(code, "<solution>", "exec"), {"__name__": "__main__"})
        return
    ns = {"__name__": "solution"}
    try:
        exec(compile(code, "<solution>", "exec"), ns)
    except BaseException as e:
        report({"candidate_error": repr(e)[:300]})
        raise SystemExit(1)
    for i, t in enumerate(tests):
        try:
            exec(compile(t, f"<test {i}>", "exec"), dict(ns))
            report({"test": i, "passed": True})
        except BaseException as e:
            report({"test": i, "passed": False, "error": repr(e)[:300]})
_main(*_setup())
'''
