"""Typed wire messages: every frame on every everyprompt socket is one of these.

Messages are flat frozen dataclasses holding primitives, lists, dicts of primitives and numpy arrays.
Arrays travel as one msgpack ext type (see codec.py) and decode as read-only zero-copy views.
Weights travel here only with ``rollout.weight_sync=relay`` (``WeightsOffer``, ``FetchWeights``, ``WeightsChunk``:
bounded chunks pulled by each worker); otherwise ``LoadWeights`` only names a versioned file written by the learner.

Shape letters: P = prompt tokens, T = response tokens, N = sequences in a batch, L = padded length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROTOCOL_VERSION = 6  # bump on any incompatible change to a message below


def _no_routes() -> np.ndarray:
    return np.zeros((0, 0, 0), dtype=np.uint8)


def _msg(cls):
    return dataclass(frozen=True, slots=True, kw_only=True)(cls)


# ---- control -------------------------------------------------------------------------------------------


@_msg
class Hello:
    """First frame an actor sends after connecting: who it is."""

    role: str  # "rollout" | "reward" | "learner"
    worker_id: int
    pid: int


@_msg
class Heartbeat:
    """Liveness in both directions; any frame also counts as liveness."""

    sent_at: float  # time.time() of the sender


@_msg
class Shutdown:
    reason: str = ""


@_msg
class ErrorReport:
    """An actor hit an error it cannot recover from; the coordinator stops the run with this text."""

    where: str
    error: str


# ---- rollout -------------------------------------------------------------------------------------------


@_msg
class GenerateRequest:
    """Generate ``num_samples`` responses to one prompt (a group)."""

    group_id: str
    prompt_id: int
    prompt_ids: np.ndarray  # int32 [P]
    num_samples: int
    max_new_tokens: int
    temperature: float  # 0.0 = greedy
    return_routes: bool = False  # record MoE routes (router replay); sglang's ``return_routed_experts``


@_msg
class ResponseChunk:
    """The next tokens of one response, streamed while it is generated (every ``rollout.chunk_tokens`` tokens).

    ``offset`` is the index in the response of ``token_ids[0]``; chunks of a response arrive in order and the last
    one has ``finish_reason`` "stop" (EOS included) or "length" ("" before that). Every token carries its behaviour
    log-prob and the policy version that sampled it: a response may span several versions.

    Routes (engine/modeling/routing.py) are uint8 when the model has <= 256 experts. ``routes[j]`` is the routing of
    ``token_ids[j]``; a response's final token is never fed to the model, so the last chunk has one route fewer
    than tokens. ``prompt_routes`` ([P, layers, k]) travel once per group, with the first chunk a worker sends
    for it; empty otherwise.
    """

    group_id: str
    sample_index: int
    prompt_id: int
    offset: int
    token_ids: np.ndarray  # int32 [n]
    behavior_logprobs: np.ndarray  # float32 [n], log-prob under the sampling policy (temperature applied)
    token_versions: np.ndarray  # int32 [n], policy version that sampled each token
    finish_reason: str = ""  # "" (more to come) | "stop" | "length"
    worker_id: int = 0
    routes: np.ndarray = field(default_factory=_no_routes)  # uint8/uint16 [n or n - 1, layers, k]
    prompt_routes: np.ndarray = field(default_factory=_no_routes)  # [P, layers, k], or empty


@_msg
class ContinueRequest:
    """Generate the rest of one response whose first tokens (``prefix``) were generated elsewhere (a worker that
    died, a resumed run). The worker streams chunks from ``offset = len(prefix)``; routes of the prefix tokens are
    already known (every streamed token but a final one carries its route)."""

    group_id: str
    sample_index: int
    prompt_id: int
    prompt_ids: np.ndarray  # int32 [P]
    prefix: np.ndarray  # int32 [n] response tokens so far
    max_new_tokens: int  # limit on the whole response, prefix included
    temperature: float
    return_routes: bool = False
    send_prompt_routes: bool = False


@_msg
class CancelRequest:
    """Stop generating these responses (f"{group_id}/{sample_index}"); nothing more is sent for them."""

    sample_keys: list[str]


@_msg
class LoadWeights:
    """Load policy ``version`` from ``path`` (a safetensors file the learner wrote atomically). ``digest``
    ("sha256:<hex>" of the file's bytes, engine/backends/weights_file.py) is checked against the bytes the worker
    loads; a file that does not match is refused and the worker keeps its previous version. "" = not known (the
    worker loads it unverified, and logs so)."""

    version: int
    path: str
    digest: str = ""



@_msg
class WeightsOffer:
    """``rollout.weight_sync=relay``: policy ``version`` is ready at the coordinator (no shared filesystem). The
    worker pulls it chunk by chunk (``FetchWeights``) into its own folder, checks ``digest`` over the whole file
    and only then loads it (actors/weight_relay.py). A newer offer supersedes an unfinished transfer."""

    version: int
    digest: str  # "sha256:<hex>" of the whole file
    num_bytes: int  # file size
    chunk_bytes: int  # every chunk but the last holds exactly this many bytes (rollout.relay_chunk_bytes)


@_msg
class FetchWeights:
    """Worker -> coordinator: send chunk ``index`` of ``version``. Request-driven: a worker has a few of these
    outstanding at a time, so a slow worker is never flooded and a lost chunk is simply asked for again."""

    version: int
    index: int
    attempt: int = 0  # echoed in WeightsChunk: answers to requests the worker gave up on are told apart


@_msg
class WeightsChunk:
    """Coordinator -> worker: bytes ``[offset, offset + len(data))`` of ``version``'s file, answering FetchWeights."""

    version: int
    index: int
    offset: int  # bytes; index * chunk_bytes
    data: np.ndarray  # uint8 [n], n = chunk_bytes except for the last chunk
    crc32: int  # zlib.crc32 of data: a corrupted chunk is refused and fetched again at once
    attempt: int = 0

@_msg
class WeightsLoaded:
    """A worker applied ``version``. ``idle_s`` is its total time so far with nothing to decode (waiting for work
    or weights), ``paused_s`` its total time paused to load weights."""

    version: int
    worker_id: int = 0
    load_s: float = 0.0
    idle_s: float = 0.0
    paused_s: float = 0.0


@_msg
class WeightsWanted:
    """``rollout.weight_sync=distributed`` (engine/backends/sglang_sync.py): rollout worker -> coordinator -> learner
    rank 0. Broadcast the newest weights into this worker's sglang server on ``group_name``, opening that group
    first when the learner does not have it (``world_size`` ranks: learner rank 0 and the server's ranks 1..)."""

    group_name: str
    world_size: int
    version: int  # the newest version the worker was told of (LoadWeights)
    worker_id: int = 0


@_msg
class WeightsSending:
    """Learner rank 0 -> coordinator -> the worker of ``group_name``: what the broadcast that follows carries.
    Tensor i is ``names[i]`` (``dtypes[i]``, ``shapes[i]``), in checkpoint names and the model's dtype; bucket b
    (one /update_weights_from_distributed) is tensors ``[ends[b - 1], ends[b])``. ``master_port`` > 0: a new group
    to join first (/init_weights_update_group at ``master_address``). ``error`` non-empty: nothing is sent."""

    group_name: str
    version: int  # the version the broadcast carries (the learner's newest)
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    ends: list[int]
    world_size: int = 2
    backend: str = "gloo"  # "nccl" on GPUs
    master_address: str = ""
    master_port: int = 0
    error: str = ""


@_msg
class DropWeightGroup:
    """To learner rank 0 (from a worker, or from the coordinator when a worker is lost): forget ``group_name``."""

    group_name: str


# ---- reward --------------------------------------------------------------------------------------------


@_msg
class ScoreRequest:
    """Score one response against the reference answer."""

    sample_key: str  # f"{group_id}/{sample_index}"
    token_ids: np.ndarray  # int32 [T] response tokens
    answer: str


@_msg
class Scored:
    sample_key: str
    reward: float
    valid: bool  # False = the verifier could not score it (excluded from Eq. 11's set)
    reward_parts: dict[str, float] = field(default_factory=dict)
    text: str = ""  # detokenized response


@_msg
class JudgeRequest:
    """Judge a whole group with the generative judge (engine/rewards/judge.py): sent by the coordinator once every response
    of the group has been verified on its own. Responses are concatenated: response k is
    ``token_ids[offsets[k]:offsets[k + 1]]``."""

    group_id: str
    prompt_ids: np.ndarray  # int32 [P]
    token_ids: np.ndarray  # int32 [sum of T] every response of the group, in sample order
    offsets: np.ndarray  # int32 [G + 1]
    sample_indices: list[int]  # [G]
    answer: str
    request_id: int = 0  # echoed in Judged: a group judged again (some responses regenerated) ignores old answers


@_msg
class Judged:
    """The group's judge rewards: one margin per response (0 for an invalid one), in ``sample_indices`` order."""

    group_id: str
    sample_indices: list[int]
    rewards: list[float]
    valid: list[bool]  # False = no parsed verdict involves it (excluded from Eq. 11's set)
    parts: dict[str, float] = field(default_factory=dict)  # group counts: judge_calls, judge_parse_failures, ...
    request_id: int = 0


# ---- learner -------------------------------------------------------------------------------------------


@_msg
class TrainBatch:
    """One optimizer step's worth of sequences, right-padded to L."""

    step: int
    input_ids: np.ndarray  # int32 [N, L] prompt + response, pad after
    prompt_lens: np.ndarray  # int32 [N]
    response_lens: np.ndarray  # int32 [N]
    behavior_logprobs: np.ndarray  # float32 [N, L]; entry t is log p(input_ids[t]) under the sampler
    token_versions: np.ndarray  # int32 [N, L]; -1 outside responses
    advantages: np.ndarray  # float32 [N], one per sequence, broadcast to its tokens
    routes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0, 0), dtype=np.uint8))  # [N, L, layers, k]
    routed_lens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # int32 [N]: positions
    # [0, routed_lens[i]) of row i carry the rollout's routes (prompt + response - 1); 0 = none recorded
    zvp_sign: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))  # int8 [N]: RL-ZVP shaping
    # of a zero-variance group's tokens (+1 all-correct, -1 all-wrong, 0 = use ``advantages``); empty = none


@_msg
class SaveCheckpoint:
    """Learner: save every rank's model, optimizer and RNG state under directory ``path``, then answer."""

    step: int
    path: str


@_msg
class CheckpointSaved:
    step: int
    path: str
    seconds: float = 0.0


@_msg
class TrainResult:
    step: int
    version: int  # policy version after this step
    weights_path: str  # where the new weights are
    stats: dict[str, float] = field(default_factory=dict)
    weights_digest: str = ""  # "sha256:<hex>" of the file at weights_path (LoadWeights.digest); "" = none written


MESSAGE_TYPES: tuple[type, ...] = (
    Hello,
    Heartbeat,
    Shutdown,
    ErrorReport,
    GenerateRequest,
    ResponseChunk,
    ContinueRequest,
    CancelRequest,
    LoadWeights,
    WeightsOffer,
    FetchWeights,
    WeightsChunk,
    WeightsLoaded,
    WeightsWanted,
    WeightsSending,
    DropWeightGroup,
    ScoreRequest,
    Scored,
    JudgeRequest,
    Judged,
    TrainBatch,
    TrainResult,
    SaveCheckpoint,
    CheckpointSaved,
)
