"""What every actor process does at start: parse its arguments, read the run config, connect to the coordinator."""

from __future__ import annotations

import argparse
import os

from configs.load import load_resolved
from configs.schema import RunConfig
from engine.log import configure_logging
from transport import Hello, Peer
from transport.curve import client_keys


def actor_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True, help="the coordinator's address, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--config", required=True, help="the run's resolved config.yaml")
    p.add_argument("--worker-id", type=int, default=0, help="this worker's number, unique per role (its name in the "
                                                         "coordinator's logs and its sampling seed)")
    p.add_argument("--curve-client", default=None, help="this machine's CURVE key pair in transport.curve_keys_dir "
                                                         "(default: the config's transport.curve_client)")
    return p


def setup_actor(args: argparse.Namespace, role: str) -> RunConfig:
    cfg = load_resolved(args.config)
    configure_logging(role=role, rank=args.worker_id, json_lines=cfg.log_json)
    return cfg


def make_peer(args: argparse.Namespace, cfg: RunConfig, role: str, session: int = 0) -> Peer:
    tc = cfg.transport
    return Peer(args.endpoint, hello=Hello(role=role, worker_id=args.worker_id, pid=os.getpid()),
                heartbeat_s=tc.heartbeat_s, peer_timeout_s=tc.peer_timeout_s, max_frame_bytes=tc.max_frame_bytes,
                hwm=tc.hwm, curve=client_keys(tc.curve_keys_dir, getattr(args, "curve_client", None) or tc.curve_client)
                if tc.curve_keys_dir else None, session=session)


def run_actor(coro, role: str) -> int:
    """Run an actor's serve() on uvloop; map the ways it can end to an exit code (0 = clean Shutdown)."""
    import structlog

    from transport import PeerLost, run

    log = structlog.get_logger()
    try:
        run(coro)
    except KeyboardInterrupt:
        return 130
    except (PeerLost, BaseExceptionGroup) as e:  # a group comes from an actor's TaskGroup
        lost = e.subgroup(PeerLost) if isinstance(e, BaseExceptionGroup) else e
        if lost is None:
            raise
        log.error(f"{role}.coordinator_lost", detail="no heartbeat from the coordinator; exiting", error=str(e))
        return 3
    return 0
