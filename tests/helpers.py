"""Helpers shared by the end-to-end tests."""

import os
import time
from pathlib import Path


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text``: a test finds its own descendants by the unique tmp path
    on their command line (never by process name)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def wait_for(predicate, proc, timeout: float, what: str, poll_s: float = 0.2) -> None:
    """Poll ``predicate`` until it holds; fail if ``proc`` (a Popen) ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended early (rc={proc.returncode}) while waiting for {what}"
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")
