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

    plain = server_args("ckpt/v0", python="sglang-env/bin/python", port=30001)
    assert plain[:3] == ["sglang-env/bin/python", "-m", "sglang.launch_server"]
    assert "--enable-return-routed-experts" in plain and "--quantization" not in plain
    assert "--kv-cache-dtype" not in plain
    fp8 = server_args("ckpt/v0", python="python", quantization="fp8", kv_cache_dtype="fp8_e5m2")
    assert fp8[fp8.index("--quantization") + 1] == "fp8"
    assert fp8[fp8.index("--kv-cache-dtype") + 1] == "fp8_e5m2"
    with pytest.raises(ValueError, match="rollout.quantization"):
        server_args("ckpt/v0", python="python", quantization="int4")


def test_routes_of_a_model_with_dense_layers_keep_only_its_moe_layers():
    """sglang sizes routed_experts by num_hidden_layers (dense layers left at 0); the adapter picks the MoE ones,
    here for Qwen3-MoE's mlp_only_layers and DeepSeek-V3's first_k_dense_replace, from position 3 on."""
    from engine.modeling.adapters import adapter_for

    for config in ({"model_type": "qwen3_moe", "num_hidden_layers": 4, "mlp_only_layers": [1], "num_experts": 16,
                    "num_experts_per_tok": K},
                   {"model_type": "deepseek_v3", "num_hidden_layers": 4, "first_k_dense_replace": 1,
                    "n_routed_experts": 16, "num_experts_per_tok": K}):
        adapter = adapter_for(config)
        sparse = adapter.sparse_layers()
        assert len(sparse) == 3
        rng = np.random.default_rng(3)
        prompt_len, completion_len, start = 5, 4, 3
        rows = prompt_len + completion_len - 1 - start
        full = np.zeros((rows, 4, K), "<i4")
        full[:, sparse] = rng.integers(0, 16, size=(rows, 3, K))
        payload = base64.b64encode(full.tobytes()).decode()
        prompt_routes, routes = decode_routed_experts(payload, prompt_len=prompt_len, completion_len=completion_len,
                                                      num_layers=4, top_k=K, num_experts=16, start=start,
                                                      adapter=adapter)
        assert prompt_routes.shape == (prompt_len - start, 3, K) and routes.shape == (completion_len - 1, 3, K)
        np.testing.assert_array_equal(np.concatenate([prompt_routes, routes]), full[:, sparse])
        with pytest.raises(ValueError, match="bytes"):  # the MoE layers alone are not what sglang sends
            decode_routed_experts(base64.b64encode(full[:, sparse].tobytes()).decode(), prompt_len=prompt_len,
                                  completion_len=completion_len, num_layers=4, top_k=K, num_experts=16,
                                  start=start, adapter=adapter)


def test_payload_asks_for_the_routes_it_lacks_and_streams():
    body = generate_payload([[5, 6, 7]], max_new_tokens=8, temperature=1.0, eos_id=2, return_routes=True,
                            routes_start=3, stream=True)
    assert body["routed_experts_start_len"] == 3 and body["stream"] is True
    plain = generate_payload([[5]], max_new_tokens=8, temperature=1.0, eos_id=2, return_routes=True)
    assert "routed_experts_start_len" not in plain and "stream" not in plain


def _streamed(ids: list[int], total: int) -> dict:
    return {"output_ids": ids, "meta_info": {"completion_tokens": total, "finish_reason": None,
                                             "output_token_logprobs": [[-1.0 * t, t, None] for t in ids]}}


def test_streamed_items_hold_all_tokens_so_far_or_only_new_ones():
    from engine.backends.sglang_wire import stream_delta

    tokens = [4, 5, 6, 7, 8]
    for chunks in ([[4], [4, 5, 6], [4, 5, 6, 7, 8]],  # sglang's default: everything so far
                   [[4], [5, 6], [7, 8]]):  # --incremental-streaming-output
        got, have = [], 0
        for ids in chunks:
            total = {4: 1, 6: 3, 8: 5}[ids[-1]]
            new, logprobs = stream_delta(_streamed(ids, total), have)
            assert logprobs == [-1.0 * t for t in new]
            got += new
            have += len(new)
        assert got == tokens
    with pytest.raises(ValueError, match="neither"):
        stream_delta(_streamed([4, 5], 7), 2)


def test_server_sent_events_become_items_and_errors_raise():
    from engine.backends.sglang_wire import iter_sse

    lines = [b'data: {"a": 1}\n', b"\n", b'data: {"a": 2}\n', b"\n", b"data: [DONE]\n", b'data: {"a": 3}\n']
    assert list(iter_sse(lines)) == [{"a": 1}, {"a": 2}]
    with pytest.raises(RuntimeError, match="context length"):
        list(iter_sse([b'data: {"error": {"message": "too long for the context length"}}\n']))


def test_a_model_folder_without_a_tokenizer_starts_sglang_tokens_only(tmp_path):
    from engine.backends.sglang import server_args

    assert "--skip-tokenizer-init" in server_args(str(tmp_path), python="python")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert "--skip-tokenizer-init" not in server_args(str(tmp_path), python="python")
