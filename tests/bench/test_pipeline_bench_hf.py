"""The pipeline bench's real-backend mode (``--backend hf``) and its coordinator-scale mode (``--scale``), run for real
at the smallest settings: every key of the JSON exists and is finite. No speed is asserted (that is the bench's job,
docs/benchmarks.md)."""

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)


def _bench(*args: str) -> dict:
    """``everyprompt-bench pipeline ARGS`` as a process (as a user runs it) -> its last-line JSON."""
    done = subprocess.run([sys.executable, "-m", "bench.cli", "pipeline", *args], capture_output=True, text=True,
                          timeout=220)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow  # 75-115 s of process start-up on a 2-core box: run with -m slow
def test_hf_mode_reports_speedups_sim_prediction_and_lengths(tmp_path):
    out = _bench(*["--backend", "hf", "--workers", "1", "--groups-per-step", "2", "--group-size", "2",
                       "--max-batch", "4", "--max-new-tokens", "16", "--mean-len", "4", "--warmup", "1", "--steps",
                       "2", "--pool-epochs-per-step", "1", "--calib-steps", "2", "--settings", "sync,async",
                       "--out-dir", str(tmp_path)])
    for key in ("async_speedup", "fraction_of_ideal", "sim_predicted_speedup", "sim_relative_error",
                "speedup_ceiling", "sync_learner_share", "version_lag_max", "discarded_samples", "cores"):
        assert _finite(out[key]), key
    assert isinstance(out["staleness_bound_held"], bool)
    assert out["stopped_samples_hf"] == 0  # EOS is suppressed: every response runs to its prompt's limit
    for key in ("mean", "p50", "p99", "max", "max_over_mean"):
        assert _finite(out["lengths"][key]), key
    for cal in ("decode_base_s", "decode_per_seq_s", "prefill_per_token_s"):
        assert _finite(out["calibration"][cal]), cal
    for backend in ("hf", "sim"):
        for setting in ("sync", "async"):
            r = out["settings"][backend][setting]
            for key in ("tokens_per_s", "speedup_vs_sync", "fraction_of_ideal", "version_lag_max", "max_staleness",
                        "coordinator_lag_ms_p99", "discarded_samples"):
                assert _finite(r[key]), (backend, setting, key)


def test_scale_mode_reports_coordinator_load(tmp_path):
    out = _bench(*["--scale", "8", "--scale-processes", "2", "--groups-per-step", "1",
                       "--max-new-tokens", "32", "--mean-len", "8", "--chunk-tokens", "8", "--time-scale", "2",
                       "--reward-workers", "1", "--warmup", "1", "--steps", "2", "--pool-epochs-per-step", "1",
                       "--out-dir", str(tmp_path)])
    assert set(out["scale"]) == {"8"}
    for r in out["scale"].values():
        for key in ("tokens_per_s", "tokens_per_s_per_worker", "scaling_efficiency", "coordinator_lag_ms_p99",
                    "frames_per_s", "coordinator_cpu_frac", "coordinator_cpu_us_per_frame", "box_cpu_frac"):
            assert _finite(r[key]), key
    for key in ("coordinator_frames_per_s_capacity", "coordinator_limit_workers", "coordinator_limit_workers_real_time"):
        assert _finite(out[key]), key
    assert isinstance(out["bound"], str)
