"""The sglang backend's request/response handling, on payloads built to sglang's documented format
(``meta_info.routed_experts`` = base64 of int32 [seqlen - 1, layers, k]; ``output_token_logprobs`` rows
``[logprob, token_id, text]``). sglang itself cannot run here."""

import base64

import numpy as np
import pytest

from engine.backends.sglang import decode_routed_experts, generate_payload, parse_generate_response
from engine.modeling.routing import pack_routes

LAYERS, K, EXPERTS = 3, 2, 16


def _item(prompt_len: int, token_ids: list[int], rng, experts: int = EXPERTS) -> tuple[dict, np.ndarray]:
    ids = rng.integers(0, experts, size=(prompt_len + len(token_ids) - 1, LAYERS, K)).astype(np.int32)
    meta = {"id": "x", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": prompt_len,
            "completion_tokens": len(token_ids),
            "output_token_logprobs": [[-0.5 - j, t, None] for j, t in enumerate(token_ids)],
            "routed_experts": base64.b64encode(ids.astype("<i4").tobytes()).decode()}
    return {"text": "", "output_ids": token_ids, "meta_info": meta}, ids


def test_payload_asks_for_logprobs_and_routes():
    body = generate_payload([[5, 6], [7]], max_new_tokens=8, temperature=0.7, eos_id=2, return_routes=True)
    assert body["input_ids"] == [[5, 6], [7]] and body["return_logprob"] is True
    assert body["return_routed_experts"] is True
    assert body["sampling_params"] == {"temperature": 0.7, "max_new_tokens": 8, "stop_token_ids": [2],
                                       "skip_special_tokens": False}


def test_routes_decode_into_the_same_uint8_record_as_the_hf_backend():
    rng = np.random.default_rng(0)
    prompts = [[3, 4, 5, 6], [7, 8]]
    items, raw = zip(*[_item(len(prompts[0]), [10, 11, 2], rng), _item(len(prompts[1]), [12], rng)])
    outs = parse_generate_response(list(items), prompts, num_layers=LAYERS, top_k=K, num_experts=EXPERTS,
                                   return_routes=True)
    assert outs[0].token_ids == [10, 11, 2] and outs[0].logprobs == [-0.5, -1.5, -2.5]
    for out, prompt, ids in zip(outs, prompts, raw):
        assert out.prompt_routes.dtype == np.uint8 and out.routes.dtype == np.uint8
        assert out.prompt_routes.shape == (len(prompt), LAYERS, K)
        assert out.routes.shape == (len(out.token_ids) - 1, LAYERS, K)
        np.testing.assert_array_equal(np.concatenate([out.prompt_routes, out.routes]), ids)
    # and they pack into the learner's batch exactly like the transformers backend's routes
    routes, routed = pack_routes([(o.prompt_routes, o.routes) for o in outs], 8)
    assert routed.tolist() == [6, 2]  # P + T - 1
    np.testing.assert_array_equal(routes[0, :6], raw[0])


def test_more_than_256_experts_widens_the_record():
    rng = np.random.default_rng(1)
    item, ids = _item(3, [9, 9], rng, experts=300)
    prompt_routes, routes = decode_routed_experts(item["meta_info"]["routed_experts"], prompt_len=3,
                                                  completion_len=2, num_layers=LAYERS, top_k=K, num_experts=300)
    assert routes.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate([prompt_routes, routes]), ids)


@pytest.mark.parametrize("mutate, match", [
    (lambda m: m.update(routed_experts="not base64!"), "not base64"),
    (lambda m: m.update(routed_experts=m["routed_experts"][:-8]), "bytes"),
    (lambda m: m.pop("routed_experts"), "enable-return-routed-experts"),
    (lambda m: m.pop("output_token_logprobs"), "return_logprob"),
    (lambda m: m.update(routed_experts=base64.b64encode(np.full(4 * LAYERS * K, 99, "<i4").tobytes()).decode()),
     "16 routed experts"),
])
def test_malformed_responses_are_refused_with_the_reason(mutate, match):
    item, _ = _item(2, [5, 6, 7], np.random.default_rng(2))
    mutate(item["meta_info"])
    with pytest.raises(ValueError, match=match):
        parse_generate_response([item], [[1, 2]], num_layers=LAYERS, top_k=K, num_experts=EXPERTS,
                                return_routes=True)


def test_fp8_rollout_options_become_sglang_server_arguments():
    from engine.backends.sglang import server_args

    plain = server_args("ckpt/v0", port=30001)
    assert plain[:3] == ["python", "-m", "sglang.launch_server"]
    assert "--enable-return-routed-experts" in plain and "--quantization" not in plain
    assert "--kv-cache-dtype" not in plain
    fp8 = server_args("ckpt/v0", quantization="fp8", kv_cache_dtype="fp8_e5m2")
    assert fp8[fp8.index("--quantization") + 1] == "fp8"
    assert fp8[fp8.index("--kv-cache-dtype") + 1] == "fp8_e5m2"
    with pytest.raises(ValueError, match="rollout.quantization"):
        server_args("ckpt/v0", quantization="int4")
