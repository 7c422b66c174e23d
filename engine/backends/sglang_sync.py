"""``rollout.weight_sync=distributed``: new weights broadcast from learner rank 0 into each sglang server over a
process group of its own, the way production RL stacks feed sglang (AReaL, slime), with no file in between.

What sglang 0.5.23 offers (its source: ``srt/entrypoints/http_server.py``, ``srt/managers/io_struct.py``,
``srt/managers/tokenizer_control_mixin.py``, ``srt/managers/scheduler_components/weight_updater.py``):

- ``POST /init_weights_update_group {master_address, master_port, rank_offset, world_size, group_name, backend}``:
  every tensor-parallel rank of the server joins a new process group as rank ``rank_offset + tp_rank``
  (``init_custom_process_group``: a ``tcp://`` rendezvous, a ``PrefixStore(group_name)``, a new group outside the
  server's own world). Answers ``{success, message}``, HTTP 400 on failure.
- ``POST /begin_weight_update {selector}`` opens a weight-update session (a second one is refused: "a
  weight-update session is already open"); ``POST /update_weights_from_distributed {names, dtypes, shapes,
  group_name, flush_cache, weight_version, load_format}`` outside a session answers success false ("must run
  between begin_weight_update() and end_weight_update()"). Inside one it allocates each named tensor, receives it
  with ``torch.distributed.broadcast(src=0)`` on that group, in ``names`` order, then loads the bucket into the
  model; a failure answers HTTP 400 with the message. ``weight_version`` is recorded only on success.
  ``POST /end_weight_update {}`` closes the session; ``POST /destroy_weights_update_group {group_name}``.

The protocol (docs/guides/gpu-cluster.md, "Weight sync"): the rollout worker, which owns its server, drives the
HTTP calls; learner rank 0 (actors/weight_sync.py) drives the collective.

1. The coordinator sends ``LoadWeights(version)`` to every worker, as on the disk path.
2. The worker asks for weights: ``WeightsWanted(group_name, world_size)`` through the coordinator to the learner,
   while its server keeps generating.
3. Between two optimizer steps the learner answers ``WeightsSending``: the version it holds now, the manifest
   (names, dtypes, shapes, split into buckets of at most ``BUCKET_BYTES``) and, for a group it does not have yet,
   the rendezvous port of a new one. Then it opens that group (if new) and broadcasts every bucket, tensor by
   tensor, in the model's dtype, with sglang's checkpoint names (engine/backends/sglang_wire.py ``hub_layout``).
4. The worker joins a new group (``/init_weights_update_group``), pauses its server and folds in the partial
   outputs exactly as the disk path does, opens a session, calls ``/update_weights_from_distributed`` once per
   bucket (the last one with ``flush_cache`` and ``weight_version``), closes the session and continues.

Integrity: one session carries exactly one version, and the version label comes from the sender with the
manifest, so tokens are never attributed to weights they were not sampled from. The server never generates
between two buckets (it is paused for the whole session). Every bucket is received even after one is refused, so
the collective stays matched. A version that no bucket of loaded keeps the previous one (``WeightsRejected``,
as a refused disk update); one that loaded only in part is repaired from the disk file of the same version
(``LoadWeights.path``, checked against its digest) or, failing that, the worker stops (its server must not serve
a mix; the coordinator restarts it with a fresh server). After any failure the worker drops its group and asks
for a new one, so a group whose collectives may have fallen out of step is never used again.

Nothing here imports sglang; torch only inside the functions that need it (the worker's side is torch-free).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import structlog

log = structlog.get_logger()

BUCKET_BYTES = 256 * 1024 * 1024  # one /update_weights_from_distributed call (slime's default buffer: 512 MiB)
SYNC_TIMEOUT_S = 120.0  # the group's collectives (its rendezvous included) fail after this long


def group_name(instance: str) -> str:
    """A new, never reused name for one server's group (``instance``: the backend's own id)."""
    return f"everyprompt-{instance}-{uuid.uuid4().hex[:8]}"


# ---- both sides: the group and the manifest -------------------------------------------------------------------


def init_custom_process_group(*, backend: str, world_size: int, rank: int, group_name: str, timeout_s: float,
                              init_method: str = "", store=None):
    """A process group outside this process's default world (it may have none), as sglang's
    ``sglang.srt.utils.init_custom_process_group`` builds it on the server: a ``tcp://`` rendezvous (or ``store``,
    the rank-0 side's own ``TCPStore``), keys under ``PrefixStore(group_name)``, ranks 0..world_size-1 mapped to
    themselves so ``torch.distributed.broadcast(src=0, group=...)`` works on both sides."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), dist.PrefixStore(group_name, store),
                                         group_name=group_name, backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


@dataclass
class Manifest:
    """What one version's broadcast carries, in order: tensor i is ``names[i]`` (``dtypes[i]``, ``shapes[i]``);
    bucket b is tensors ``[ends[b - 1], ends[b])``."""

    names: list[str]
    dtypes: list[str]  # torch dtype names as sglang reads them ("bfloat16", "float32")
    shapes: list[list[int]]
    ends: list[int]

    def buckets(self) -> list[tuple[int, int]]:
        return list(zip([0, *self.ends[:-1]], self.ends))


def manifest_of(state: dict, bucket_bytes: int = BUCKET_BYTES) -> Manifest:
    """The manifest of ``state`` (name -> tensor, in its order): consecutive tensors packed into buckets of at most
    ``bucket_bytes`` (a larger tensor travels alone)."""
    names, dtypes, shapes, ends, size = [], [], [], [], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if names and size + nbytes > bucket_bytes:
            ends.append(len(names))
            size = 0
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append(list(t.shape))
        size += nbytes
    if names:
        ends.append(len(names))
    return Manifest(names, dtypes, shapes, ends)


# ---- the worker's side: the HTTP calls ------------------------------------------------------------------------


def join_group(client, sending) -> None:
    """``/init_weights_update_group`` for a new group (blocks until learner rank 0 has joined it too); the server's
    ranks are 1.. (``rank_offset`` 1: learner rank 0 is rank 0)."""
    from engine.backends.sglang_wire import SGLangHTTPError

    body = {"master_address": sending.master_address, "master_port": sending.master_port, "rank_offset": 1,
            "world_size": sending.world_size, "group_name": sending.group_name, "backend": sending.backend}
    try:
        result = client.post("/init_weights_update_group", body)
    except SGLangHTTPError as e:
        result = {"success": False, "message": e.body.get("message", str(e))}
    if not result.get("success", False):
        raise RuntimeError(f"sglang at {client.url} could not join weight group {sending.group_name} at "
                           f"{sending.master_address}:{sending.master_port}: {result.get('message')}. Is learner "
                           f"rank 0 reachable from the server (transport.host)?")


def receive_buckets(client, sending) -> tuple[int, list[str]]:
    """One ``/update_weights_from_distributed`` per bucket of ``sending`` inside an open session, every bucket even
    after a refused one (the learner is broadcasting all of them) -> (buckets loaded, refusal messages)."""
    from engine.backends.sglang_wire import SGLangHTTPError

    buckets = list(zip([0, *sending.ends[:-1]], sending.ends))
    loaded, refused = 0, []
    for b, (lo, hi) in enumerate(buckets):
        last = b == len(buckets) - 1
        body = {"names": sending.names[lo:hi], "dtypes": sending.dtypes[lo:hi], "shapes": sending.shapes[lo:hi],
                "group_name": sending.group_name, "flush_cache": last}
        if last and not refused:
            body["weight_version"] = str(sending.version)
        try:
            result = client.post("/update_weights_from_distributed", body)
        except SGLangHTTPError as e:  # 400: refused
            result = {"success": False, "message": e.body.get("message", str(e))}
        if result.get("success", False):
            loaded += 1
        else:
            refused.append(f"bucket {b + 1}/{len(buckets)}: {result.get('message')}")
    return loaded, refused


def session(client, path: str) -> None:
    """``/begin_weight_update`` or ``/end_weight_update``; raises RuntimeError with the server's message."""
    from engine.backends.sglang_wire import SGLangHTTPError

    try:
        result = client.post(path, {"selector": "all"} if path == "/begin_weight_update" else {})
    except SGLangHTTPError as e:
        result = {"success": False, "message": e.body.get("message", str(e))}
    if not result.get("success", False):
        raise RuntimeError(f"sglang at {client.url} {path}: {result.get('message')}")


def drop_group(client, name: str) -> None:
    """``/destroy_weights_update_group`` (best effort: a group that never formed is gone anyway)."""
    try:
        client.post("/destroy_weights_update_group", {"group_name": name}, timeout_s=30.0)
    except Exception as e:  # noqa: BLE001 - the group is abandoned either way
        log.info("weights.group_drop_failed", group=name, error=str(e)[:200])
