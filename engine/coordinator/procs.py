"""Child processes of the coordinator: started in their own session, logged to files, never orphaned.

Each actor runs in a new session so a terminal Ctrl-C reaches only the coordinator, which then shuts the actors
down in order (Shutdown message, then SIGTERM to the process group, then SIGKILL). Each child also asks the
kernel for SIGTERM when the coordinator dies (PR_SET_PDEATHSIG), and every actor exits by itself when the
coordinator's heartbeats stop (transport.PeerLost): three independent guards against orphans.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux; elsewhere heartbeats still apply)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    die_with_parent()


@dataclass
class Child:
    name: str  # e.g. "rollout-0"
    popen: subprocess.Popen
    log_path: Path
    argv: list[str]
    env: dict[str, str] | None = None

    def exited(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, num_lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no log)"


def spawn(name: str, argv: list[str], *, log_dir: Path, env: dict[str, str] | None = None) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=full_env, preexec_fn=_child_setup, close_fds=True)
    return Child(name=name, popen=popen, log_path=log_path, argv=argv, env=env)


def respawn(child: Child) -> Child:
    """Kill what is left of ``child`` (its whole session) and start it again with the same command line."""
    stop_all([child], grace_s=0.0)
    return spawn(child.name, child.argv, log_dir=child.log_path.parent, env=child.env)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stop_all(children: list[Child], *, grace_s: float = 10.0) -> None:
    """Wait for children to exit after a Shutdown message; then SIGTERM, then SIGKILL their process groups."""
    for sig, wait_s in ((None, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        alive = [c for c in children if c.exited() is None or _session_alive(c)]
        if not alive:
            return
        if sig is not None:
            for c in alive:
                try:
                    os.killpg(c.popen.pid, sig)  # the child's whole session: torchrun and its ranks too
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(c.exited() is None or (sig and _session_alive(c)) for c in alive):
            time.sleep(0.05)


def _session_alive(c: Child) -> bool:
    """Whether anything of the child's session (process group) is left after the child itself exited: a killed
    rollout worker's sglang server, a killed torchrun's ranks. They go with it (a server left behind would hold
    the GPU and the port its replacement needs)."""
    try:
        os.killpg(c.popen.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
