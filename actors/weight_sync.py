"""Learner rank 0's side of ``rollout.weight_sync=distributed`` (the protocol: engine/backends/sglang_sync.py).

consumes: WeightsWanted, DropWeightGroup (rollout workers, through the coordinator)
produces: WeightsSending (to that worker, through the coordinator), then the broadcast on its group
blocks on: the group's collectives (in a thread; bounded by ``SYNC_TIMEOUT_S``), between two optimizer steps

One process group per server (learner rank 0 is rank 0, the server's ranks follow), opened when that server first
asks: a server that joins later gets its own group, a lost one's group is dropped (``DropWeightGroup``, or a
broadcast that fails). Each answer carries the version the learner holds at that moment and broadcasts exactly
those weights: the learner's message loop runs nothing else meanwhile, so no optimizer step changes them mid-way.
The weights are ``LearnerRank.hf_state()`` (experts already gathered under expert parallelism) in sglang's
checkpoint names (``hub_layout``) and the model's dtype (config.json), NCCL from CUDA tensors on a GPU, gloo from
CPU tensors otherwise: the same calls either way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import structlog
import torch

from engine.backends.sglang_sync import BUCKET_BYTES, SYNC_TIMEOUT_S, init_custom_process_group, manifest_of
from engine.backends.sglang_wire import hub_layout, model_dtype
from transport.messages import DropWeightGroup, WeightsSending, WeightsWanted

log = structlog.get_logger()


class WeightSender:
    def __init__(self, init_dir: str, *, master_address: str, timeout_s: float = SYNC_TIMEOUT_S,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        self.config = json.loads((Path(init_dir) / "config.json").read_text())
        self.dtype = model_dtype(self.config)
        self.master_address, self.timeout_s, self.bucket_bytes = master_address, timeout_s, bucket_bytes
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.groups: dict[str, object] = {}  # group name -> its process group (joined)

    def state(self, hf_state: dict) -> dict[str, torch.Tensor]:
        """The tensors sglang's loader reads: checkpoint names, the model's dtype, contiguous (on the GPU for
        NCCL)."""
        device = "cuda" if self.backend == "nccl" else "cpu"
        out = {}
        for name, t in hub_layout(hf_state, self.config).items():
            t = t.detach().to(device=device, dtype=self.dtype if t.is_floating_point() else t.dtype)
            out[name] = t.contiguous()
        return out

    def answer(self, msg: WeightsWanted, hf_state: dict, version: int):
        """(the ``WeightsSending`` to send, the job that then opens the group if new and broadcasts; None when the
        answer is a refusal). Call the job in a thread once the answer is sent."""
        state = self.state(hf_state)
        m = manifest_of(state, self.bucket_bytes)
        fields = dict(group_name=msg.group_name, version=version, names=m.names, dtypes=m.dtypes, shapes=m.shapes,
                      ends=m.ends, world_size=msg.world_size, backend=self.backend)
        store = None
        if msg.group_name not in self.groups:
            from datetime import timedelta

            import torch.distributed as dist

            try:  # port 0: the OS picks a free one, held from now on (no bind-and-release race)
                store = dist.TCPStore(self.master_address, 0, msg.world_size, is_master=True,
                                      timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False)
            except (RuntimeError, OSError) as e:
                return WeightsSending(**fields, error=f"learner rank 0 cannot listen on {self.master_address}: "
                                                      f"{e} (transport.host)"), None
            fields.update(master_address=self.master_address, master_port=store.port)
        return WeightsSending(**fields), lambda: self._send(msg, state, m, version, store)

    def _send(self, msg: WeightsWanted, state: dict, m, version: int, store) -> bool:
        """Open the group (new: ``store`` given) and broadcast every bucket -> True once sent; a failure drops the
        group (its collectives may be out of step) and is logged, never raised: the worker reports its side."""
        import torch.distributed as dist

        t0, name = time.perf_counter(), msg.group_name
        try:
            if store is not None:
                self.groups[name] = init_custom_process_group(backend=self.backend, world_size=msg.world_size,
                                                              rank=0, group_name=name, timeout_s=self.timeout_s,
                                                              store=store)
            group = self.groups[name]
            for lo, hi in m.buckets():
                for tensor_name in m.names[lo:hi]:
                    dist.broadcast(state[tensor_name], src=0, group=group)
        except Exception as e:  # noqa: BLE001 - the actor boundary of one transfer: the run goes on without it
            log.warning("weights.broadcast_failed", group=name, worker=msg.worker_id, version=version,
                        error=f"{type(e).__name__}: {str(e)[:300]}")
            self.drop(name)
            return False
        num_bytes = sum(t.numel() * t.element_size() for t in state.values())
        log.info("weights.broadcast", group=name, worker=msg.worker_id, version=version, tensors=len(m.names),
                 buckets=len(m.ends), num_bytes=num_bytes, seconds=round(time.perf_counter() - t0, 3))
        return True

    def drop(self, name: str) -> None:
        import torch.distributed as dist

        group = self.groups.pop(name, None)
        if group is not None:
            try:
                dist.destroy_process_group(group)
            except Exception as e:  # noqa: BLE001 - forgotten either way
                log.info("weights.group_destroy_failed", group=name, error=str(e)[:200])

    def handle_drop(self, msg: DropWeightGroup) -> None:
        self.drop(msg.group_name)
