"""GPU check (issue 13, item 4): real-width Qwen3-Next layers through the trainer's own set-up.

    python tests/gpu/check.py [--out DIR] [--fla-path DIR] [--budget S]     # one H200 (tests/gpu/check.sh)
    python tests/gpu/check.py --cpu --out DIR                              # tiny widths, CPU (make test)

Writes a 4-layer student (3 Gated DeltaNet + 1 gated attention) at the real Qwen3-Coder-Next widths
(`trainer.param_table.QWEN3_CODER_NEXT`: hidden 2048, 512 experts top-10, vocab 151,936) with random
bf16 weights as sharded safetensors in the published per-expert layout, with the Qwen tokenizer and
our chat template; then, in one process per kernel mode, builds it with the trainer's production
path (`trainer.model.build_models`: meta init, FSDP2 root over the decoder, LoRA wrapping, weight
loading per shard, per-layer gradient checkpointing, the fast-kernel guard) from
`deploy/configs/trainer.h200.yaml`, and times one warm-up and N measured optimizer steps
(`trainer.train.distill_loss` forward + backward, clipping, AdamW on the hypernetwork) on one
synthetic sequence of T tokens per run, recording peak memory and tokens/s:

- kernel modes, most important first: ``fla`` (flash-linear-attention's chunked gated delta rule,
  importable from ``--fla-path``) then ``torch`` (fla hidden: transformers' PyTorch fallback);
- T = 4k, 16k, 32k per mode; a run predicted to overrun the time left or the per-run cap is
  skipped, and so is the rest of a mode once a run exceeded the cap or ran out of memory;
- each mode runs in a subprocess that is killed when the budget is spent; what it finished stays.

Output ``<out>/gpu_check.json`` (read by ``trainer.plan``):
``{"device", "torch", "transformers", "fla", "world_size", "config", "runs": [{"tokens", "kernels",
"ok", "peak_allocated_bytes", "peak_reserved_bytes", "param_bytes", "step_seconds", "tokens_per_s",
"error", ...}], ...}``; extra keys (build and write times, kernel bindings, checkpoint recompute
counts) are additions a reader may ignore.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `tests` importable
    sys.path.insert(0, str(ROOT))
try:
    import hyperdistill.trainer  # noqa: F401  (installed: pip install -e .)
except ModuleNotFoundError:  # a checkout that is not installed (the GPU machine): the folders are the namespace
    import types

    sys.modules["hyperdistill"] = types.ModuleType("hyperdistill")
    sys.modules["hyperdistill"].__path__ = [str(ROOT)]

RESULT_FILE = "gpu_check.json"
GPU_TOKENS = (4096, 16384, 32768)
CPU_TOKENS = (64, 128, 256)
MODES = ("fla", "torch")
PROMPT_TOKENS = 1536  # system + first user message: what the hypernetwork reads
VOCAB_BPE = 151643  # ids below this are ordinary BPE tokens (no specials)
DEFAULT_CONFIG = ROOT / "deploy/configs/trainer.h200.yaml"
# CPU mode at tiny widths keeps the code path and shrinks the work: float32 (bf16 matmuls are slow on
# CPU) and a small hypernetwork (the H200 one's ~19M parameters dominate a tiny student's step).
CPU_OVERRIDES = [
    "student.dtype=float32",
    "hypernetwork.encoder_dim=64",
    "hypernetwork.encoder_heads=4",
    "hypernetwork.trunk_dim=64",
]
STAMP = "gpu_check_stamp.json"


# ---- the student -----------------------------------------------------------------------------
def student_config(widths: str, num_experts: int | None = None) -> dict:
    """Qwen3NextConfig kwargs: ``real``, the Qwen3-Coder-Next widths with 4 layers (3 DeltaNet + 1
    attention), or ``tiny``, the tiny student's widths; ``num_experts`` shrinks the MoE (a smoke run of
    the real widths on CPU)."""
    from tests.devtools.tiny_models import BOS_ID, EOS_ID, STUDENT_CONFIG

    if widths == "tiny":
        config = dict(STUDENT_CONFIG)
    else:
        config = _real_config(BOS_ID, EOS_ID)
    if num_experts:
        config.update(num_experts=num_experts, num_experts_per_tok=min(config["num_experts_per_tok"], num_experts))
    return config


def _real_config(bos: int, eos: int) -> dict:
    from hyperdistill.trainer.param_table import QWEN3_CODER_NEXT

    return dict(
        QWEN3_CODER_NEXT,
        num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        max_position_embeddings=262144,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        dtype="bfloat16",
    )


def write_student(model_dir: Path, config: dict, cpu: bool, shard_size: str) -> dict:
    """Save a random student (config, sharded safetensors, tokenizer, our template) unless the
    directory already holds this exact one. Returns what was done."""
    import torch
    import transformers
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from hyperdistill.common.dirs import replace_dir
    from tests.devtools.tiny_models import _save_model

    key = {
        "config": config,
        "shard_size": shard_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "check": _file_digest(Path(__file__)),
    }
    stamp = model_dir / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        print(f"[write] reusing {model_dir}", flush=True)
        return {"reused": True, "bytes": _dir_bytes(model_dir), "seconds": 0.0}
    start = time.perf_counter()
    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds for ~7B parameters
        model = Qwen3NextForCausalLM._from_config(Qwen3NextConfig(**config), dtype=torch.bfloat16)
    sanity = _sanity_forward(model, device)
    built = time.perf_counter() - start
    tmp = model_dir.with_name(model_dir.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # tiny_models' writer (generation config, tokenizer files, our chat template), sharded: it calls
    # `model.save_pretrained(out)`, which writes the published per-expert tensor layout.
    model.save_pretrained = functools.partial(model.save_pretrained, max_shard_size=shard_size)
    _save_model(model, tmp)
    (tmp / STAMP).write_text(json.dumps({"key": key}) + "\n")
    params = sum(p.numel() for p in model.parameters())
    del model
    replace_dir(tmp, model_dir)
    seconds = time.perf_counter() - start
    size = _dir_bytes(model_dir)
    files = len(list(model_dir.glob("*.safetensors")))
    print(
        f"[write] {params / 1e9:.2f}B params, {size / 2**30:.1f} GiB in {files} safetensors files, "
        f"{seconds:.0f} s (init {built:.0f} s); sanity {sanity}",
        flush=True,
    )
    return {"reused": False, "bytes": size, "files": files, "params": params, "seconds": seconds, "sanity": sanity}


def _sanity_forward(model, device) -> dict:
    """A short no-grad forward of the random student: every activation finite, the residual stream and
    the last MoE block's output of a sane size, and the first router spreading tokens over experts."""
    import torch

    seen: dict[str, float] = {}

    def rms(x) -> float:
        x = x[0] if isinstance(x, tuple) else x
        return round(float(x.float().pow(2).mean().sqrt()), 4)

    def record(key: str):
        return lambda module, args, output: seen.__setitem__(key, rms(output))

    def experts(module, args, output) -> None:
        indices = next((o for o in (output if isinstance(output, tuple) else ()) if not o.is_floating_point()), None)
        if indices is not None:
            seen["router0_distinct_experts"] = int(indices.unique().numel())

    layers = model.model.layers
    hooks = [
        layers[-1].register_forward_hook(record("residual_rms")),
        layers[-1].mlp.register_forward_hook(record("moe_out_rms")),
        model.model.embed_tokens.register_forward_hook(record("embed_rms")),
    ]
    if hasattr(layers[0].mlp, "gate"):
        hooks.append(layers[0].mlp.gate.register_forward_hook(experts))
    ids = torch.randint(0, VOCAB_BPE, (1, 128), device=device)
    try:
        with torch.no_grad():
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden[:, -8:]).float()
    finally:
        for hook in hooks:
            hook.remove()
    finite = bool(torch.isfinite(hidden).all()) and bool(torch.isfinite(logits).all())
    result = {"finite": finite, **seen, "logit_std": round(float(logits.std()), 4)}
    if not finite or not all(v == v and v != float("inf") for v in seen.values()):
        raise RuntimeError(f"the random student gives non-finite activations: {result}")
    return result


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---- one kernel mode, in its own process -------------------------------------------------------
def hide_fast_kernels() -> None:
    """Make flash-linear-attention and causal-conv1d unimportable in this process (before transformers'
    Qwen3-Next module binds its kernels), so the DeltaNet layers take the PyTorch fallback even where
    the packages are installed."""
    for name in ("fla", "causal_conv1d"):
        sys.modules[name] = None  # `import fla` raises ImportError; importlib.util.find_spec -> None


QWEN3_NEXT_MODULE = "transformers.models.qwen3_next.modeling_qwen3_next"


def kernel_bindings(module, student=None) -> dict:
    """What transformers' Qwen3-Next DeltaNet calls, read off its modeling ``module`` (and, when given,
    a built ``student``'s first DeltaNet layer).

    transformers up to about 5.16 binds at import: module globals ``chunk_gated_delta_rule`` /
    ``causal_conv1d_fn`` are the package functions or None, and each layer keeps
    ``self.chunk_gated_delta_rule = chunk_gated_delta_rule or torch_chunk_gated_delta_rule``. Later
    versions decorate ``torch_chunk_gated_delta_rule`` / ``causal_conv1d_fn`` with
    ``use_kernel_func_from_hub_with_fallback``, a wrapper closing over the ``implementation`` it found
    at import (fla's kernel, or the torch body itself).
    """
    missing = object()

    def name(fn) -> str:
        for _ in range(4):  # unwrap the hub-kernel wrappers
            free = getattr(getattr(fn, "__code__", None), "co_freevars", ())
            if "implementation" not in free:
                break
            inner = fn.__closure__[free.index("implementation")].cell_contents
            if inner is fn or inner is None:
                break
            fn = inner
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

    chunk = module.__dict__.get("chunk_gated_delta_rule", missing)
    if chunk is missing or chunk is None:
        chunk = getattr(module, "torch_chunk_gated_delta_rule", None)
    conv = module.__dict__.get("causal_conv1d_fn")
    found = {
        "chunk_gated_delta_rule": name(chunk) if chunk is not None else "none",
        "causal_conv1d_fn": name(conv) if conv is not None else "torch F.conv1d (no causal_conv1d_fn)",
    }
    layer = (
        None
        if student is None
        else next((m for m in student.modules() if type(m).__name__.endswith("GatedDeltaNet")), None)
    )
    if layer is not None:
        for attribute in ("chunk_gated_delta_rule", "causal_conv1d_fn"):
            bound = getattr(layer, attribute, missing)
            if bound is not missing:  # per-instance binding: this is what forward calls
                found[attribute] = name(bound) if bound is not None else "torch F.conv1d (no causal_conv1d_fn)"
        found["norm"] = f"{type(layer.norm).__module__}.{type(layer.norm).__qualname__}"
    found["fla_active"] = found["chunk_gated_delta_rule"].startswith("fla.")
    found["causal_conv1d_active"] = found["causal_conv1d_fn"].startswith("causal_conv1d")
    return found


def bind_fla() -> dict:
    """Import transformers' Qwen3-Next module as the trainer would and report its DeltaNet binding; if
    flash-linear-attention imports but was not bound (transformers <= 5.16 looked for it with
    ``getattr(fla, "ops")`` before ``fla.ops`` was imported), import ``fla.ops.gated_delta_rule`` and
    reload the module, so that the fla runs measure fla. Returns what was found and done."""
    import importlib

    module = importlib.import_module(QWEN3_NEXT_MODULE)
    report = {"as_imported": kernel_bindings(module)}
    if report["as_imported"]["fla_active"]:
        return report
    try:
        importlib.import_module("fla.ops.gated_delta_rule")
    except Exception as e:  # not installed or broken: nothing to fix here
        report["fla_import_error"] = f"{type(e).__name__}: {e}"
        return report
    importlib.reload(module)
    report["after_preimport"] = kernel_bindings(module)
    report["preimport_needed"] = report["after_preimport"]["fla_active"]
    return report


def run_mode(args) -> None:
    """Build the student with the trainer's code and time every requested T; the result file is
    rewritten after each run, so a kill keeps what finished."""
    if args.kernels == "torch":
        hide_fast_kernels()
    state = {"kernels": args.kernels, "runs": [], "current": None}
    result = Path(args.result)

    def save() -> None:
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, default=str))
        tmp.replace(result)

    started = time.perf_counter()
    import torch
    import transformers

    _datasets_or_stand_in(state)

    from hyperdistill.common.config import load_config
    from hyperdistill.common.tokenizer import load_tokenizer
    from hyperdistill.trainer.config import TrainerConfig
    from hyperdistill.trainer.distributed import close_distributed, init_distributed
    from hyperdistill.trainer.model import build_models

    fla_version = _version("fla-core") or _version("flash-linear-attention")
    if args.kernels == "fla":
        state["fla_binding"] = bind_fla()
        if os.environ.get("GPU_CHECK_FLA_TRITON_BYPASS") == "1":
            # fla 0.6.0 refuses the gated chunk_bwd_dqkwg on Hopper with Triton 3.4-3.7.0 (fla #640:
            # wrong dq/dk/dg there). The image's Triton is 3.6 and a newer one (198 MB) cannot be
            # carried, so this times the kernels with that guard lifted: time and memory are the
            # kernel's, its gradients are not trustworthy. Production needs Triton >= 3.7.1 or tilelang.
            import fla.ops.common.chunk_o as chunk_o

            chunk_o.TRITON_ABOVE_3_7_1 = True
            state["fla_triton_bypass"] = "fla #640 guard lifted: timings and memory only, gradients untrusted"
    state.update(
        torch=torch.__version__,
        transformers=transformers.__version__,
        fla=fla_version if args.kernels == "fla" else None,
        import_seconds=time.perf_counter() - started,
    )
    dist = init_distributed()
    cuda = dist.device.type == "cuda"
    state.update(device=torch.cuda.get_device_name(dist.device) if cuda else "cpu", world_size=dist.world_size)
    overrides = [
        f"student.path={args.model_dir}",
        f"student.require_fast_kernels={'true' if args.kernels == 'fla' else 'false'}",
        "wandb.mode=disabled",
        "metrics.port=0",
        f"run_dir={Path(args.result).parent / 'run'}",
        f"checkpoint.dir={Path(args.result).parent / 'ckpt'}",
        *(CPU_OVERRIDES if args.cpu and args.widths == "tiny" else []),
        *args.override,
    ]
    state["overrides"] = overrides
    try:
        cfg = load_config(TrainerConfig, args.config, overrides=overrides)
        state["hypernetwork"] = {
            k: getattr(cfg.hypernetwork, k)
            for k in ("kind", "rank", "alpha", "encoder_dim", "trunk_dim", "max_prompt_tokens", "targets")
        }
        save()
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(cfg.student.path, cfg.student.chat_template)
        student, hyper = build_models(cfg, dist, tokenizer)
        _sync(cuda)
    except Exception as e:  # recorded for every run of this mode, then the process fails
        state["error"] = traceback.format_exc()[-4000:]
        state["runs"] = [_failed(t, args.kernels, f"set-up failed: {type(e).__name__}: {e}") for t in args.tokens]
        save()
        raise
    state["build_seconds"] = time.perf_counter() - t0
    state["config"] = student.config.to_dict()
    state["kernel_bindings"] = kernel_bindings(sys.modules[QWEN3_NEXT_MODULE], student)
    student_bytes = _param_bytes(student.parameters())
    hyper_bytes = _param_bytes(hyper.parameters())
    state.update(
        param_bytes_student=student_bytes,
        param_bytes_hyper=hyper_bytes,
        allocated_after_build_bytes=torch.cuda.memory_allocated() if cuda else None,
    )
    print(
        f"[{args.kernels}] built in {state['build_seconds']:.0f} s on {state['device']}: student "
        f"{student_bytes / 2**30:.1f} GiB, hypernetwork {hyper_bytes / 2**20:.0f} MiB; kernels "
        f"{state['kernel_bindings']}",
        flush=True,
    )
    save()
    if args.kernels == "fla" and not state["kernel_bindings"].get("fla_active"):
        error = f"flash-linear-attention is not what the DeltaNet layers call: {state['kernel_bindings']}"
        state["runs"] = [_failed(t, args.kernels, error) for t in args.tokens]
        save()
        close_distributed()
        return

    calls = _count_layer_calls(student)
    optimizer = torch.optim.AdamW(
        hyper.parameters(), lr=cfg.phases[0].lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay
    )
    previous = None  # (tokens, measured seconds per step) of the last run that finished
    stop = None  # why the rest of this mode is skipped
    for tokens in args.tokens:
        left = args.deadline - time.time()
        if stop is None and previous is not None:
            # Steps scale about linearly in T here (DeltaNet, MoE, chunked loss); attention's T^2 is small.
            predicted = previous[1] * (tokens / previous[0]) ** 1.15 * (1 + args.steps)
            if predicted > left - 5:
                stop = f"skipped: predicted {predicted:.0f} s with {left:.0f} s of the budget left"
            elif args.run_cap and predicted > args.run_cap:
                stop = f"skipped: predicted {predicted:.0f} s > the {args.run_cap:.0f} s cap per run"
        if stop is not None:
            state["runs"].append(_failed(tokens, args.kernels, stop))
            save()
            print(f"[{args.kernels}] T={tokens}: {stop}", flush=True)
            continue
        state["current"] = tokens
        save()
        run = _run_one(args, cfg, dist, student, hyper, optimizer, calls, tokens, student_bytes + hyper_bytes)
        state["runs"].append(run)
        state["current"] = None
        save()
        if run["ok"]:
            previous = (tokens, run["step_seconds"])
            print(
                f"[{args.kernels}] T={tokens}: {run['step_seconds']:.2f} s/step, {run['tokens_per_s']:,.0f} tok/s, "
                f"peak {run['peak_allocated_bytes'] / 2**30:.1f} GiB allocated / "
                f"{run['peak_reserved_bytes'] / 2**30:.1f} GiB reserved, warm-up {run['warmup_seconds']:.1f} s, "
                f"loss {run['loss']:.4g}, layer calls/step {run['layer_calls_per_step']}",
                flush=True,
            )
            # The cap is on steady-state cost: the first warm-up's one-off compilation does not count.
            cost = run["step_seconds"] * (1 + args.steps)
            if args.run_cap and cost > args.run_cap:
                stop = f"skipped: T={tokens} cost {cost:.0f} s > the {args.run_cap:.0f} s cap per run"
        else:
            print(f"[{args.kernels}] T={tokens}: FAILED {run['error']}", flush=True)
            if run.get("oom"):
                stop = f"skipped: T={tokens} ran out of memory"
    state["total_seconds"] = time.perf_counter() - started
    save()
    close_distributed()


def _run_one(args, cfg, dist, student, hyper, optimizer, calls, tokens: int, param_bytes: int) -> dict:
    """One warm-up and ``args.steps`` measured optimizer steps on one sequence of ``tokens`` tokens."""
    import gc

    import torch

    from hyperdistill.trainer.train import distill_loss

    cuda = dist.device.type == "cuda"
    run = {
        "tokens": tokens,
        "kernels": args.kernels,
        "ok": False,
        "peak_allocated_bytes": 0,
        "peak_reserved_bytes": 0,
        "param_bytes": param_bytes,
        "step_seconds": 0.0,
        "tokens_per_s": 0.0,
        "error": None,
    }
    started = time.perf_counter()
    batch = teacher = None
    try:
        batch, teacher = synthetic_inputs(
            tokens, min(PROMPT_TOKENS, tokens // 4), cfg.teacher.top_k, dist.device, seed=tokens
        )
        num_tokens = float(teacher[2].sum())
        run["assistant_tokens"] = int(num_tokens)
        run["prompt_tokens"] = int(batch.prompt_ids.shape[1])

        loss_fn = _loss_fn(distill_loss, dist.device)

        def step() -> torch.Tensor:
            loss = loss_fn(student, hyper, batch, *teacher, num_tokens, cfg.optim)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hyper.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        if cuda:  # this run's own peak: the allocator's cache of the last run released, its peak forgotten
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        step()
        _sync(cuda)
        run["warmup_seconds"] = time.perf_counter() - t
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        calls.clear()
        times, losses = [], []
        for _ in range(args.steps):
            t = time.perf_counter()
            loss = step()
            _sync(cuda)
            times.append(time.perf_counter() - t)
            losses.append(loss)
        if cuda:
            run["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            run["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        else:  # the process's peak RSS so far: an upper bound, not this run's own peak
            import resource

            run["peak_allocated_bytes"] = run["peak_reserved_bytes"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
        run["step_seconds"] = sum(times) / len(times)
        run["step_seconds_all"] = times
        run["tokens_per_s"] = tokens / run["step_seconds"]
        run["loss"] = float(losses[-1])
        run["layer_calls_per_step"] = [calls.get(i, 0) // args.steps for i in range(len(student.model.layers))]
        if not all(map(_finite, (float(x) for x in losses))):
            raise FloatingPointError(f"non-finite loss {[float(x) for x in losses]}")
        run["ok"] = True
    except Exception as e:  # OOM or anything else: recorded, and the next run still gets its chance
        oom = isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
        run["oom"] = oom
        run["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500] if str(e).strip() else ''}"
        if not oom:
            run["traceback"] = traceback.format_exc()[-4000:]
        if cuda:
            run["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            run["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        optimizer.zero_grad(set_to_none=True)
    finally:
        batch = teacher = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    run["run_seconds"] = time.perf_counter() - started
    return run


def _datasets_or_stand_in(state: dict) -> None:
    """``datasets`` is imported by trainer.data at module level (feature schemas) but never used by this
    check. Should the carried wheel not import on the GPU image (its pyarrow too old, say), a stand-in
    module lets the trainer's modules import; the result file records it."""
    try:
        import datasets  # noqa: F401
    except Exception as e:
        import types

        class StandIn(types.ModuleType):
            def __getattr__(self, name: str):
                if name.startswith("__"):
                    raise AttributeError(name)
                return lambda *args, **kwargs: None

        sys.modules["datasets"] = StandIn("datasets")
        state["datasets_stand_in"] = f"{type(e).__name__}: {e}"
        print(f"[check] datasets does not import ({state['datasets_stand_in']}): using a stand-in", flush=True)


def _loss_fn(distill_loss, device):
    """``trainer.train.distill_loss`` as ``(student, hyper, batch, ids, logprobs, mask, num_tokens, optim) -> loss``
    whether or not it also takes the device and also returns the generated LoRA."""
    import inspect

    takes_device = "device" in inspect.signature(distill_loss).parameters

    def call(*args):
        out = distill_loss(*args, device) if takes_device else distill_loss(*args)
        return out[0] if isinstance(out, tuple) else out

    return call


def synthetic_inputs(tokens: int, prompt: int, top_k: int, device, seed: int):
    """One sequence of ``tokens`` random BPE ids (the first ``prompt`` of them the hypernetwork's
    prompt, every later one an assistant target) and the teacher's top-K on every position:
    distinct ids, sorted log-probs with some mass left in the tail. Returns (Batch, (ids, logprobs, mask))
    with the teacher tensors on ``device`` as the trainer makes them (ids int64 [1, T-1, K],
    logprobs float32 [1, T-1, K], mask bool [1, T-1])."""
    import torch

    from hyperdistill.trainer.data.sampler import Batch

    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB_BPE, (1, tokens), generator=gen)
    loss_mask = torch.zeros(1, tokens, dtype=torch.bool)
    loss_mask[:, prompt:] = True
    batch = Batch(
        input_ids=input_ids,
        attention_mask=torch.ones(1, tokens, dtype=torch.int64),
        loss_mask=loss_mask,
        prompt_ids=input_ids[:, :prompt].clone(),
        prompt_mask=torch.ones(1, prompt, dtype=torch.bool),
        trajectory_ids=[f"synthetic-{tokens}"],
    )
    dgen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randint(0, VOCAB_BPE, (1, tokens - 1, 1), generator=dgen, device=device)
    ids = (base + torch.arange(top_k, device=device) * 7919) % VOCAB_BPE  # distinct: top_k * 7919 < vocab
    logits = torch.randn(1, tokens - 1, top_k + 1, generator=dgen, device=device) * 2.0
    logprobs = torch.log_softmax(logits, dim=-1)[..., :top_k].sort(dim=-1, descending=True).values
    mask = loss_mask[:, 1:].to(device)
    return batch, (ids, logprobs.float(), mask)


def _count_layer_calls(student) -> dict:
    """Forward calls per decoder layer (2 per step when checkpoint recompute runs)."""
    calls: dict[int, int] = {}
    for index, layer in enumerate(student.model.layers):

        def hook(module, args, index=index):
            calls[index] = calls.get(index, 0) + 1

        layer.register_forward_pre_hook(hook)
    return calls


def _param_bytes(params) -> int:
    total = 0
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _failed(tokens: int, kernels: str, error: str) -> dict:
    return {
        "tokens": tokens,
        "kernels": kernels,
        "ok": False,
        "peak_allocated_bytes": 0,
        "peak_reserved_bytes": 0,
        "param_bytes": 0,
        "step_seconds": 0.0,
        "tokens_per_s": 0.0,
        "error": error,
    }


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- orchestration -------------------------------------------------------------------------------
def merge_mode(kernels: str, tokens: list[int], state: dict | None, exit_note: str | None) -> list[dict]:
    """Every requested run of one mode: the finished ones from ``state`` (the mode's result file,
    None if it never wrote one) and a failed record for each of the others saying why."""
    done = {r["tokens"]: r for r in (state or {}).get("runs", [])}
    current = (state or {}).get("current")
    runs = []
    for t in tokens:
        if t in done:
            runs.append(done[t])
        elif t == current:
            runs.append(_failed(t, kernels, f"killed during this run: {exit_note or 'the mode process ended'}"))
        else:
            runs.append(_failed(t, kernels, f"not run: {exit_note or 'the mode process ended before it'}"))
    return runs


def _last_error(tail: list[str]) -> str:
    """The last non-empty output line (a traceback's exception line), without torch's rank prefix."""
    lines = [line.removeprefix("[rank0]:").strip() for line in tail if line.strip()]
    return lines[-1][:400] if lines else "no output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(argv: list[str], env: dict, timeout: float, tag: str) -> tuple[int | None, list[str]]:
    """Run ``argv``, echoing its output with a tag; kill its process group at ``timeout`` seconds.
    Returns (exit code or None when killed, last output lines)."""
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        cwd=ROOT,
    )

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"  {tag}| {line.rstrip()}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        code = None
    reader.join(timeout=10)
    return code, list(tail)


def _child_env(args, kernels: str | None) -> dict:
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if kernels == "fla" and args.fla_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.fla_path, env.get("PYTHONPATH")) if p)
    return env


def orchestrate(args) -> int:
    start = time.time()
    deadline = start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "modes"
    work.mkdir(exist_ok=True)
    report = {
        "device": None,
        "torch": None,
        "transformers": None,
        "fla": None,
        "world_size": 1,
        "config": None,
        "runs": [],
        "cpu_mode": args.cpu,
        "budget_seconds": args.budget,
        "tokens": args.tokens,
        "kernels": args.kernel_modes,
        "model_dir": str(args.model_dir),
        "modes": {},
    }
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--model-dir", str(args.model_dir), "--config", str(args.config), "--widths", args.widths]
    common += (["--cpu"] if args.cpu else []) + (["--num-experts", str(args.num_experts)] if args.num_experts else [])

    write_file = work / "write.json"
    code, tail = _child(
        me + ["--stage", "write", "--result", str(write_file), "--shard-size", args.shard_size] + common,
        _child_env(args, None),
        deadline - time.time(),
        "write",
    )
    report["write"] = json.loads(write_file.read_text()) if write_file.is_file() else None
    if code != 0 or report["write"] is None:
        note = "killed at the time budget" if code is None else f"exit {code}"
        report["write_error"] = f"writing the student failed ({note}): " + _last_error(tail)
        for kernels in args.kernel_modes:
            report["runs"] += merge_mode(kernels, args.tokens, None, "the student could not be written")
        return _finish(report, out, start)

    for kernels in args.kernel_modes:
        result = work / f"{kernels}.json"
        result.unlink(missing_ok=True)
        left = deadline - time.time()
        if left < (20 if args.cpu else 75):  # a GPU mode needs about a minute to start and build
            report["runs"] += merge_mode(
                kernels, args.tokens, None, f"skipped: {max(left, 0):.0f} s of the budget left"
            )
            continue
        argv = (
            me
            + [
                "--stage",
                "run",
                "--kernels",
                kernels,
                "--result",
                str(result),
                "--deadline",
                str(deadline),
                "--steps",
                str(args.steps),
                "--run-cap",
                str(args.run_cap),
                "--tokens",
                ",".join(map(str, args.tokens)),
            ]
            + common
        )
        argv += [x for o in args.override for x in ("--override", o)]
        code, tail = _child(argv, _child_env(args, kernels), deadline - time.time() + 10, kernels)
        state = json.loads(result.read_text()) if result.is_file() else None
        note = None
        if code is None:
            note = f"the time budget ({args.budget:.0f} s) ran out"
        elif code != 0:
            note = f"the mode process failed (exit {code}): " + _last_error(tail)
        report["runs"] += merge_mode(kernels, args.tokens, state, note)
        meta = {k: v for k, v in (state or {}).items() if k not in ("runs", "current", "config")}
        meta.update(exit_code=code, log_tail=tail[-12:] if code != 0 else [])
        report["modes"][kernels] = meta
        if state:
            for key in ("device", "torch", "transformers", "world_size"):
                report[key] = report[key] or state.get(key)
            report["config"] = report["config"] or state.get("config")
            if kernels == "fla" and state.get("kernel_bindings", {}).get("fla_active"):
                report["fla"] = state.get("fla")
    return _finish(report, out, start)


def _finish(report: dict, out: Path, start: float) -> int:
    report["total_seconds"] = time.time() - start
    path = out / RESULT_FILE
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(format_table(report))
    print(f"wrote {path} ({report['total_seconds']:.0f} s)")
    return 0 if report["runs"] and any(r["ok"] for r in report["runs"]) else 1


def format_table(report: dict) -> str:
    gib = 2**30
    lines = [
        f"GPU check: {report.get('device')} | torch {report.get('torch')} | transformers "
        f"{report.get('transformers')} | fla {report.get('fla')}",
        f"{'kernels':7} {'tokens':>6} {'ok':>3} {'step_s':>8} {'tok/s':>9} {'alloc_GiB':>9} {'resv_GiB':>9}  note",
    ]
    for r in report["runs"]:
        note = "" if r["ok"] else (r["error"] or "")[:90]
        if r["ok"] and r.get("warmup_seconds") is not None:
            note = f"warm-up {r['warmup_seconds']:.1f} s"
        lines.append(
            f"{r['kernels']:7} {r['tokens']:>6} {'yes' if r['ok'] else 'no':>3} {r['step_seconds']:>8.2f} "
            f"{r['tokens_per_s']:>9,.0f} {r['peak_allocated_bytes'] / gib:>9.1f} "
            f"{r['peak_reserved_bytes'] / gib:>9.1f}  {note}"
        )
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny widths on CPU (what make test runs)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu-check"), help="result directory")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where the random student is written (default: $TMPDIR/hyperdistill-gpu-check/...)",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="trainer config (the H200 one)")
    parser.add_argument("--override", action="append", default=[], help="extra config override a.b=c (repeatable)")
    parser.add_argument("--tokens", default=None, help="comma-separated sequence lengths (default 4096,16384,32768)")
    parser.add_argument("--kernels", default=None, help="kernel modes in order, comma-separated (fla,torch)")
    parser.add_argument("--fla-path", default=None, help="directory holding flash-linear-attention (fla mode only)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for everything (default 400; CPU 600)")
    parser.add_argument("--run-cap", type=float, default=None, help="seconds per run before a mode stops (default 150)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run after one warm-up (2; CPU 1)")
    parser.add_argument(
        "--widths", choices=("tiny", "real"), default=None, help="student widths (default: real; tiny with --cpu)"
    )
    parser.add_argument(
        "--num-experts",
        type=int,
        default=None,
        help="fewer experts than the real 512 (smoke runs of the real widths on CPU)",
    )
    parser.add_argument("--shard-size", default=None, help="safetensors shard size (default 2GB; CPU 20MB)")
    # internal: the per-stage subprocesses
    parser.add_argument("--stage", choices=("all", "write", "run"), default="all", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tokens = (
        [int(t) for t in args.tokens.split(",")] if args.tokens else list(CPU_TOKENS if args.cpu else GPU_TOKENS)
    )
    if args.stage == "run":
        if args.kernels not in MODES:
            parser.error(f"--stage run needs --kernels in {MODES}")
    else:
        modes = args.kernels.split(",") if args.kernels else (["torch"] if args.cpu else list(MODES))
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            parser.error(f"unknown kernel modes {unknown}; choose from {MODES}")
        args.kernel_modes = modes
    if args.budget is None:
        args.budget = 600.0 if args.cpu else 400.0
    if args.run_cap is None:
        args.run_cap = 0.0 if args.cpu else 150.0
    if args.steps is None:
        args.steps = 1 if args.cpu else 2
    if args.widths is None:
        args.widths = "tiny" if args.cpu else "real"
    if args.shard_size is None:
        args.shard_size = "20MB" if args.cpu else "2GB"
    if args.model_dir is None:
        base = Path(os.environ.get("TMPDIR", "/tmp")) / "hyperdistill-gpu-check"
        args.model_dir = base / f"student-{args.widths}{f'-{args.num_experts}experts' if args.num_experts else ''}"
    if args.deadline is None:
        args.deadline = time.time() + args.budget
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "write":
        config = student_config(args.widths, args.num_experts)
        info = write_student(Path(args.model_dir), config, args.cpu, args.shard_size)
        info["config"] = config
        Path(args.result).write_text(json.dumps(info, indent=1, default=str))
        return 0
    if args.stage == "run":
        run_mode(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
