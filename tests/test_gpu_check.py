"""tests/gpu/check.sh keeps working: its CPU mode (tiny widths, the trainer's own set-up) end to end,
and the pieces of its bookkeeping that only the GPU run would otherwise exercise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.gpu import check

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = {
    "tokens",
    "kernels",
    "ok",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "param_bytes",
    "step_seconds",
    "tokens_per_s",
    "error",
}


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """check.sh --cpu: writes the tiny student as sharded safetensors, builds it with build_models,
    times one warm-up and one measured step at T = 64, 128, 256 with the torch kernels."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_WHEELS="none", GPU_CHECK_BUDGET="900")
    proc = subprocess.run(
        ["bash", str(ROOT / "tests/gpu/check.sh"), "--cpu", "--model-dir", str(out / "student")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / check.RESULT_FILE).read_text()), proc.stdout


def test_cpu_mode_writes_the_report(cpu_report):
    out, report, stdout = cpu_report
    assert {"device", "torch", "transformers", "fla", "world_size", "config", "runs"} <= set(report)
    assert report["device"] == "cpu" and report["world_size"] == 1 and report["fla"] is None
    assert report["config"]["hidden_size"] == 128 and report["config"]["num_hidden_layers"] == 4
    assert report["config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert [(r["kernels"], r["tokens"]) for r in report["runs"]] == [("torch", t) for t in check.CPU_TOKENS]
    for run in report["runs"]:
        assert RUN_KEYS <= set(run)
        assert run["ok"], run["error"]
        assert run["error"] is None
        assert run["step_seconds"] > 0 and run["tokens_per_s"] == pytest.approx(run["tokens"] / run["step_seconds"])
        assert run["peak_allocated_bytes"] > 0 and run["peak_reserved_bytes"] > 0 and run["param_bytes"] > 0
        assert run["loss"] == run["loss"] and run["loss"] > 0  # finite, positive KL
        # Gradient checkpointing runs in the trainer's own set-up: every layer runs twice per step.
        assert run["layer_calls_per_step"] == [2, 2, 2, 2]
    write = report["write"]
    assert write["files"] > 1  # sharded safetensors, read back shard by shard
    assert write["sanity"]["finite"]
    assert report["modes"]["torch"]["kernel_bindings"]["fla_active"] is False
    assert (out / "gpu_check.log").read_text().strip()
    assert "kernels tokens" in stdout  # the closing table


def test_merge_mode_names_what_did_not_run():
    state = {"runs": [{**check._failed(4096, "torch", "x"), "ok": True, "error": None}], "current": 16384}
    runs = check.merge_mode("torch", [4096, 16384, 32768], state, "the time budget (390 s) ran out")
    assert [r["ok"] for r in runs] == [True, False, False]
    assert runs[1]["error"].startswith("killed during this run: the time budget")
    assert runs[2]["error"].startswith("not run: the time budget")
    assert all(RUN_KEYS <= set(r) for r in runs)
    crashed = check.merge_mode("fla", [4096], None, None)
    assert crashed[0]["kernels"] == "fla" and not crashed[0]["ok"] and crashed[0]["error"].startswith("not run")


def test_kernel_bindings_reads_both_transformers_styles():
    def fla_kernel():
        pass

    fla_kernel.__module__ = "fla.ops.gated_delta_rule.chunk"

    def torch_chunk_gated_delta_rule():
        pass

    def hub_wrapper(implementation):  # use_kernel_func_from_hub_with_fallback's closure
        def wrapped(*args, **kwargs):
            return implementation(*args, **kwargs)

        return wrapped

    old_fla = types.SimpleNamespace(
        chunk_gated_delta_rule=fla_kernel,
        causal_conv1d_fn=None,
        torch_chunk_gated_delta_rule=torch_chunk_gated_delta_rule,
    )
    old_torch = types.SimpleNamespace(
        chunk_gated_delta_rule=None, causal_conv1d_fn=None, torch_chunk_gated_delta_rule=torch_chunk_gated_delta_rule
    )
    new_fla = types.SimpleNamespace(torch_chunk_gated_delta_rule=hub_wrapper(fla_kernel))
    new_torch = types.SimpleNamespace(torch_chunk_gated_delta_rule=hub_wrapper(torch_chunk_gated_delta_rule))
    assert check.kernel_bindings(old_fla)["fla_active"]
    assert not check.kernel_bindings(old_torch)["fla_active"]
    assert check.kernel_bindings(new_fla)["fla_active"]
    assert not check.kernel_bindings(new_torch)["fla_active"]
    assert not check.kernel_bindings(new_fla)["causal_conv1d_active"]


def test_synthetic_teacher_is_a_valid_top_k():
    import torch

    batch, (ids, logprobs, mask) = check.synthetic_inputs(300, 75, 20, torch.device("cpu"), seed=1)
    assert batch.input_ids.shape == (1, 300) and batch.prompt_ids.shape == (1, 75)
    assert ids.shape == logprobs.shape == (1, 299, 20) and mask.shape == (1, 299)
    assert int(mask.sum()) == 300 - 75  # every position after the prompt is an assistant target
    assert all(len(set(row.tolist())) == 20 for row in ids[0])  # distinct ids per position
    assert bool((logprobs.exp().sum(-1) < 1).all())  # mass left for the tail bucket
    assert bool((logprobs[..., :-1] >= logprobs[..., 1:]).all())  # sorted like a top-K
