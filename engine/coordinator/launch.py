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
_WILDCARDS = ("0.0.0.0", "*", "::", "")
_REJOIN_S = 600  # join.json's stand-alone worker keeps joining again this long after it lost the coordinator


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_elastic(cfg: RunConfig) -> bool:
    return cfg.learner.nnodes != "1"


def learner_command(cfg: RunConfig, *, config_path: str, endpoint: str, init_dir: str, weights_dir: str,
                    master_port: int, resume: str | None = None, run_dir: str | None = None,
                    rdzv_endpoint: str = "") -> list[str]:
    """The torchrun argv that starts ``cfg.learner.num_ranks`` learner ranks (run it with ``learner_env``).

    Elastic (``learner.nnodes=MIN:MAX``): a c10d rendezvous at ``rdzv_endpoint`` (hosted by the coordinator, see
    ``Rendezvous``), which every node's agent joins with this same command; torchrun restarts the whole group when
    a rank dies or a node joins or leaves (up to ``learner.max_restarts`` times), and every (re)started group
    loads the newest complete checkpoint of ``run_dir`` (``--resume-latest``)."""
    lc = cfg.learner
    if is_elastic(cfg):
        launch = [f"--nnodes={lc.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                  f"--rdzv-id=everyprompt-{cfg.name}", f"--max-restarts={lc.max_restarts}",
                  "--rdzv-conf=is_host=false,keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=5"]
        resume_args = ["--resume-latest", str(run_dir)]
    else:
        port = master_port or _free_port()  # a small race with other binders; torchrun fails loudly if it loses
        launch = ["--nnodes=1", "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}",
                  "--max-restarts=0"]
        resume_args = ["--resume", str(resume)] if resume else []
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={lc.num_ranks}", *launch,
            "-m", "actors.learner", "--config", str(config_path), "--endpoint", endpoint,
            "--init", str(init_dir), "--weights-dir", str(weights_dir), *resume_args]


class Rendezvous:
    """The elastic learner's c10d rendezvous store, hosted by the coordinator for the whole run: agents on any
    node come and go (and the coordinator's own agent is restarted by recovery) without taking the store down.
    torchrun's agents join it as clients (``is_host=false``)."""

    def __init__(self, cfg: RunConfig) -> None:
        from datetime import timedelta

        from torch.distributed import TCPStore

        host = cfg.transport.host
        port = cfg.learner.rdzv_port or _free_port(host)
        self.store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=600),
                              use_libuv=True)
        self.endpoint = f"{host}:{port}"


def learner_threads(cfg: RunConfig, cores: int | None = None) -> int:
    """Torch threads of each learner rank on this machine: ``learner.threads_per_rank``, or with 0 (the default)
    max(1, (cores - W) // R), where cores = the CPUs this process may run on, R = ``learner.num_ranks`` and
    W = ``rollout.num_workers * rollout.threads_per_worker`` for the hf backend (its workers decode on these
    CPUs; sglang and sim workers compute elsewhere, so W = 0). The learner is 98-99% of a step at 128-512
    completions, so it gets every core the rollout workers were not given; 2 cores, 1 worker: 1 thread each."""
    if cfg.learner.threads_per_rank:
        return cfg.learner.threads_per_rank
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    rollout = cfg.rollout.num_workers * cfg.rollout.threads_per_worker if cfg.rollout.backend == "hf" else 0
    return max(1, (cores - rollout) // cfg.learner.num_ranks)


def learner_env(cfg: RunConfig) -> dict[str, str]:
    """Environment additions for ``learner_command`` (merge them into os.environ)."""
    env = {"OMP_NUM_THREADS": str(learner_threads(cfg)),
           "PYTHONPATH": os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    if "TORCH_EXTENSIONS_DIR" not in os.environ:  # DeepSpeed's JIT builds (none by default, see module doc)
        env["TORCH_EXTENSIONS_DIR"] = str(Path(cfg.out_dir).resolve() / ".torch_extensions")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    if is_elastic(cfg):  # scale-up deadlocks with a shared rendezvous store (DEPENDENCIES.md §4)
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        if cfg.transport.host not in _WILDCARDS:  # torchrun's --local-addr: the address this node advertises to
            # the others (else its FQDN, which may resolve to loopback); an env var, so that join.json's command
            # stays right for the other nodes (each sets its own PET_LOCAL_ADDR where its FQDN does not resolve)
            env["PET_LOCAL_ADDR"] = os.environ.get("PET_LOCAL_ADDR", cfg.transport.host)
    return env


def write_join_info(run_dir: Path, cfg: RunConfig, *, endpoint: str, learner_argv: list[str] | None,
                    init_dir: str) -> None:
    """``runs/<name>/join.json``: how to add capacity to this run from another host (the same config and initial
    policy folder must be readable there): a stand-alone rollout worker and, for an elastic learner, one more
    torchrun agent. Rewritten whenever the actors (re)start, since a free port may change."""
    import json

    config = str((run_dir / "config.yaml").resolve())
    info = {"endpoint": endpoint,
            "rollout_worker": ["everyprompt-rollout-worker", "--endpoint", endpoint, "--config", config,
                               "--worker-id", "100", "--init", str(Path(init_dir).resolve()),
                               "--rejoin-s", str(_REJOIN_S)],  # a partition or a learner recovery: join again
            "learner_agent": ["python", *learner_argv[1:]] if learner_argv else None}
    tmp = run_dir / ".join.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / "join.json")
