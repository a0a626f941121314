"""The frozen student and the hypernetwork on the trainer's devices: `build_models`.

The order is what makes an 80B student fit (see `python -m hyperdistill.trainer.plan`):

1. The chat template is checked before any weight is read (a template without
   ``{% generation %}`` blocks gives no loss mask; failing after four ranks loaded 160 GB
   would waste the start-up, and a restart policy would repeat it).
2. The student is built on the meta device (no memory), its LoRA targets are wrapped and the
   hypernetwork is built for them (real init, same seed on every rank).
3. FSDP2: every decoder layer is its own unit and `student.model` is the one root over them,
   so each layer is resharded after its forward and the next layer's all-gather is prefetched.
   The embedding is ignored by FSDP and the LM head sits outside the root: both stay whole on
   every rank, because the prompt encoder and the chunked loss call them outside the
   student's forward (0.6 GB each in bf16).
4. Parameters are allocated on the device, and each rank reads from the safetensors files only
   the rows of its own shards (`load_sharded_weights`): host RAM holds one read buffer, never
   the model.
5. Per-layer gradient checkpointing is switched on for the decoder layers.
6. On CUDA, the trainer refuses to run the DeltaNet layers on transformers' PyTorch fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
from itertools import pairwise
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from hyperdistill.trainer.config import StudentConfig, TrainerConfig
from hyperdistill.trainer.data.render import check_chat_template
from hyperdistill.trainer.distributed import DistInfo
from hyperdistill.trainer.hypernetwork import HyperLoRA, build_hyper_lora
from hyperdistill.trainer.lora import enable_gradient_checkpointing

logger = logging.getLogger(__name__)

_EXPERTS = ".mlp.experts."


def build_models(cfg: TrainerConfig, dist: DistInfo, tokenizer=None) -> tuple[PreTrainedModel, HyperLoRA]:
    """The sharded, loaded, frozen student and the sharded hypernetwork, both on ``dist.device``.

    ``tokenizer``: the student's tokenizer (with ``student.chat_template`` applied); its
    template is checked before anything else is done.
    """
    if tokenizer is not None:
        check_chat_template(tokenizer)
    dtype = student_dtype(cfg.student, dist.device)
    config = AutoConfig.from_pretrained(cfg.student.path, local_files_only=True)
    # Before the model class is imported: some transformers versions bind the kernels at import
    # time and miss flash-linear-attention unless its ops module is already imported.
    check_fast_kernels(config, dist.device, required=cfg.student.require_fast_kernels)
    student = _meta_student(config, dtype)
    torch.manual_seed(cfg.seed)  # identical hypernetwork init on every rank
    hyper = build_hyper_lora(cfg.hypernetwork, student)
    shard_student(student, dtype)
    student.to_empty(device=dist.device)
    _init_buffers(student)
    load_sharded_weights(student, Path(cfg.student.path))
    if cfg.student.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    return student, shard_adapter(hyper, dist.device)


def shard_adapter(adapter: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over the hypernetwork (or any adapter), in float32, on ``device``."""
    fully_shard(adapter, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    return adapter.to(device)


def student_dtype(cfg: StudentConfig, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPU, float32 on CPU."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]


def _meta_student(config, dtype: torch.dtype) -> PreTrainedModel:
    """The student's architecture from its config, on the meta device, in eval mode."""
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return student.eval()


def shard_student(student: PreTrainedModel, dtype: torch.dtype) -> None:
    """FSDP2 over the decoder: one unit per layer under one root (`student.model`), embedding ignored.

    Each layer prefetches the next layer's all-gather in forward and the previous one's in
    backward. A layer that were its own root would stay unsharded after forward: 48 x 3.3 GB.
    """
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    layers = list(student.model.layers)
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(student.model, mp_policy=mp, ignored_params=set(student.get_input_embeddings().parameters()))
    for previous, layer in pairwise(layers):
        previous.set_modules_to_forward_prefetch([layer])
        layer.set_modules_to_backward_prefetch([previous])


def load_sharded_weights(student: nn.Module, path: Path) -> None:
    """Copy the checkpoint into ``student``'s (possibly sharded) parameters, reading only local rows.

    Reads ``model.safetensors`` or the files of ``model.safetensors.index.json``. FSDP2 shards
    dim 0, so a rank reads rows ``[start, end)`` of each tensor through safetensors' slices. Fused
    MoE expert tensors (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) are
    assembled from the published per-expert ``experts.<e>.{gate,up,down}_proj.weight`` of the
    local experts only. Raises naming every parameter the checkpoint does not cover.
    """
    files = _checkpoint_files(path)
    missing = []
    with torch.no_grad():
        for name, param in student.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            start, end = _local_rows(param)
            if not _read_rows(files, name, local, start, end):
                missing.append(name)
    if missing:
        raise KeyError(
            f"the checkpoint in {path} has no tensors for {len(missing)} student parameters: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    logger.info("student weights loaded from %s (%d files, local shards only)", path, len(set(files.values())))


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One whole tensor of the safetensors checkpoint in ``path`` (single file or sharded with an index)."""
    files = _checkpoint_files(path)
    if name not in files:
        raise KeyError(f"{path}: no tensor {name}")
    return _slice(files[name], name)


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """Rows [start, end) of dim 0 that this rank holds (FSDP2's Shard(0): ceil-sized chunks)."""
    rows = param.shape[0] if param.dim() else 1
    if not isinstance(param, DTensor):
        return 0, rows
    mesh = param.device_mesh
    chunk = math.ceil(rows / mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    return start, min(start + chunk, rows)


def _read_rows(files: dict[str, Path], name: str, local: torch.Tensor, start: int, end: int) -> bool:
    """Fill ``local`` (rows [start, end) of parameter ``name``) from the checkpoint; False if absent."""
    if end <= start:
        return True  # an empty shard: more ranks than rows
    if name in files:
        _copy(local, _slice(files[name], name, start, end), name)
        return True
    prefix, _, fused = name.rpartition(_EXPERTS)
    if fused not in ("gate_up_proj", "down_proj"):
        return False
    parts = ("down_proj",) if fused == "down_proj" else ("gate_proj", "up_proj")
    keys = [[f"{prefix}{_EXPERTS}{expert}.{part}.weight" for part in parts] for expert in range(start, end)]
    if not all(key in files for row in keys for key in row):
        return False
    for row, expert_keys in enumerate(keys):  # one expert's tensor in memory at a time
        offset = 0
        for key in expert_keys:
            part = _slice(files[key], key)
            _copy(local[row, offset : offset + part.shape[0]], part, key)
            offset += part.shape[0]
    return True


def _slice(file: Path, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        view = f.get_slice(name)
        return view[start:end] if view.get_shape() and start is not None else view[:]


def _copy(local: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if tuple(local.shape) != tuple(source.shape):
        raise ValueError(
            f"checkpoint tensor {name} of shape {list(source.shape)} does not fit the student's "
            f"{list(local.shape)}: the checkpoint and the student's config.json disagree"
        )
    local.copy_(source.to(local.dtype))


def _init_buffers(student: PreTrainedModel) -> None:
    """Compute the non-persistent buffers (rotary inverse frequencies), which no checkpoint holds
    and meta init leaves as garbage, with the model's own initialiser. Runs before the weights are
    loaded, since it may also initialise those modules' parameters."""
    for module in student.modules():
        if any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)):
            student._init_weights(module)


def fast_kernels() -> dict[str, bool]:
    """Which optional DeltaNet kernels import: flash-linear-attention's chunked gated delta rule
    (the expensive part: transformers' fallback is a Python loop over 64-token chunks) and
    causal-conv1d (the fallback is a depthwise `F.conv1d`, cheap next to it)."""
    found = {}
    for package, module, attr in (
        ("flash-linear-attention", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
        ("causal-conv1d", "causal_conv1d", "causal_conv1d_fn"),
    ):
        try:
            found[package] = hasattr(importlib.import_module(module), attr)
        except Exception:  # a broken install counts as absent, whatever it raises
            found[package] = False
    return found


def check_fast_kernels(config, device: torch.device, *, required: bool) -> None:
    """On CUDA with DeltaNet layers (``linear_attention`` in the student config's ``layer_types``):
    raise unless flash-linear-attention imports (``required``), else warn. Nothing to check on
    CPU, where the kernels do not run."""
    has_deltanet = "linear_attention" in (getattr(config, "layer_types", None) or ())
    if device.type != "cuda" or not has_deltanet:
        return
    found = fast_kernels()
    if not found["causal-conv1d"]:
        logger.warning("causal-conv1d is not installed: DeltaNet convolutions use PyTorch's conv1d")
    if found["flash-linear-attention"]:
        _check_hopper_triton(device)
        logger.info("DeltaNet kernels: %s", found)
        return
    message = (
        "flash-linear-attention is not installed (or does not import): the DeltaNet layers would run "
        "transformers' PyTorch fallback, an order of magnitude slower; install it "
        "(`pip install flash-linear-attention`, as deploy/trainer.Dockerfile does) or set "
        "student.require_fast_kernels=false to run anyway"
    )
    if required:
        raise RuntimeError(message)
    logger.warning(message)


def _check_hopper_triton(device: torch.device) -> None:
    """flash-linear-attention refuses its gated backward on Hopper with Triton 3.4-3.7.0 (wrong
    gradients there, fla issue #640) unless tilelang is installed: fail at start, not at the first
    backward after the student has loaded."""
    import triton
    from packaging.version import Version

    triton_version = Version(triton.__version__)
    if torch.cuda.get_device_capability(device)[0] != 9 or not Version("3.4") <= triton_version < Version("3.7.1"):
        return
    if importlib.util.find_spec("tilelang") is None:
        raise RuntimeError(
            f"Triton {triton.__version__} on a Hopper GPU: flash-linear-attention's gated delta rule "
            "backward is wrong there and refuses to run (fla #640); install Triton >= 3.7.1 or "
            "tilelang (`pip install tilelang`)"
        )
