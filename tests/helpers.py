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


def initial_and_perturbed_policy(tmp_path):
    """(v0, v1): the run's initial policy (``tmp_path/init``) and a perturbed copy saved as weight version 1."""
    import torch

    from engine.modeling.model import load_model, save_weights

    v0 = load_model(tmp_path / "init").eval()
    v1 = load_model(tmp_path / "init").eval()
    with torch.no_grad():
        for p in v1.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_weights(v1, tmp_path / "weights" / "policy_v1.safetensors")
    return v0, v1
