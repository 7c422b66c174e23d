"""How the coordinator launches the learner: torchrun (torch.distributed's launcher) running actors.learner.

Kept in engine/ so the coordinator builds the command line without importing the learner (or DeepSpeed).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch

from configs.schema import RunConfig

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def learner_command(cfg: RunConfig, *, config_path: str, endpoint: str, init_dir: str, weights_dir: str,
                    master_port: int, resume: str | None = None) -> list[str]:
    """The torchrun argv that starts ``cfg.learner.num_ranks`` learner ranks (run it with ``learner_env``)."""
    port = master_port or _free_port()  # a small race with other binders; torchrun fails loudly if it loses
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.learner.num_ranks}",
            "--nnodes=1", "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}",
            "--max-restarts=0", "-m", "actors.learner", "--config", str(config_path), "--endpoint", endpoint,
            "--init", str(init_dir), "--weights-dir", str(weights_dir)] + (["--resume", str(resume)] if resume else [])


def learner_env(cfg: RunConfig) -> dict[str, str]:
    """Environment additions for ``learner_command`` (merge them into os.environ)."""
    env = {"OMP_NUM_THREADS": str(cfg.learner.threads_per_rank),
           "PYTHONPATH": os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    if "TORCH_EXTENSIONS_DIR" not in os.environ:  # DeepSpeed's JIT builds (none by default, see module doc)
        env["TORCH_EXTENSIONS_DIR"] = str(Path(cfg.out_dir).resolve() / ".torch_extensions")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env
