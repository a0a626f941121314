"""A trained hypernetwork as a directory that other tools load, written from a training checkpoint:

    python -m hyperdistill.trainer.export --checkpoint runs/x/checkpoints --out HYPER_DIR [--overwrite]

The directory, in the layout of ``save_pretrained``:

    config.json        {"format", "version", "hypernetwork": HyperLoRAConfig, "student": name or path,
                        "targets": [{"name", "kind", "layer", "in_features", "out_features"}, ...]}
    model.safetensors  the adapter's state dict (encoder, generator, LoRA bank; not the student's
                       embedding table, which the encoder reads from the student it is loaded on)

`load_hypernetwork` rebuilds it on a student and refuses one whose targets differ in name or
shape, naming them. `student_skeleton` gives that student without its weights (meta device) plus
its real embedding table, so neither command loads an 80B student to read or write adapters.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hyperdistill.common.config import config_from_dict, config_to_dict
from hyperdistill.common.dirs import default_permissions, replace_dir
from hyperdistill.common.log import setup_logging
from hyperdistill.trainer.checkpoint import checkpoint_path, load_weights
from hyperdistill.trainer.hypernetwork import Adapter, HyperLoRAConfig, Target, build_hyper_lora, find_targets
from hyperdistill.trainer.model import read_tensor

logger = logging.getLogger(__name__)

FORMAT = "hyperdistill-hypernetwork"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMBEDDING = "model.embed_tokens.weight"


def save_hypernetwork(adapter: Adapter, student: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adapter`` (trained for ``student``, a name or path) to directory ``out``, atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        config = {
            "format": FORMAT,
            "version": VERSION,
            "hypernetwork": config_to_dict(adapter.config),
            "student": student,
            "targets": [_target_dict(t) for t in adapter.targets],
        }
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in adapter.state_dict().items()}, str(work / WEIGHTS_FILE))
        default_permissions(work)
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("hypernetwork (%s, %d targets) written to %s", adapter.config.kind, len(adapter.targets), out)
    return out


def read_config(directory: str | Path) -> dict:
    """The directory's config.json, checked to be a hypernetwork export."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an exported hypernetwork: no {CONFIG_FILE}")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {config.get('format')!r} version {config.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return config


def load_hypernetwork(directory: str | Path, student: nn.Module) -> Adapter:
    """The exported hypernetwork of ``directory`` on ``student`` (whose targets it wraps), in eval
    mode. Raises ValueError naming every target whose name or shape differs from the export's."""
    config = read_config(directory)
    hyper_config = config_from_dict(HyperLoRAConfig, config["hypernetwork"], prefix="hypernetwork.")
    check_targets(config["targets"], find_targets(student, hyper_config.targets), config["student"])
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten below
        adapter = build_hyper_lora(hyper_config, student)
    adapter.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)), strict=True)
    return adapter.eval()


def check_targets(stored: list[dict], found: list[Target], trained_for: str) -> None:
    """Refuse a student whose LoRA targets differ from those the hypernetwork was trained for."""
    want = {t["name"]: (t["in_features"], t["out_features"]) for t in stored}
    have = {t.name: (t.in_features, t.out_features) for t in found}
    problems = [f"{name}: missing" for name in sorted(set(want) - set(have))]
    problems += [f"{name}: not in the export" for name in sorted(set(have) - set(want))]
    problems += [
        f"{name}: [in, out] {list(have[name])}, the export's {list(want[name])}"
        for name in sorted(set(want) & set(have))
        if want[name] != have[name]
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(
            f"this student's LoRA targets differ from the hypernetwork's (trained for {trained_for}): {shown}"
        )


def student_skeleton(path: str | Path) -> nn.Module:
    """The student of ``path`` without its weights (meta device), but with its real input
    embedding table, which is all a hypernetwork reads (float32, on the CPU)."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config)
    embed = student.get_input_embeddings()
    weight = read_tensor(Path(path), EMBEDDING).to(torch.float32)
    if tuple(weight.shape) != tuple(embed.weight.shape):
        raise ValueError(f"{path}: {EMBEDDING} is {list(weight.shape)}, the config says {list(embed.weight.shape)}")
    student.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=True))
    return student.requires_grad_(False)


def _target_dict(target: Target) -> dict:
    return {
        "name": target.name,
        "kind": target.kind,
        "layer": target.layer,
        "in_features": target.in_features,
        "out_features": target.out_features,
    }


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, *, student: str | None = None, overwrite: bool = False
) -> Path:
    """Read the hypernetwork of a training checkpoint (a ``step_*`` directory, or a directory of
    them: the latest) and write it with `save_hypernetwork`. ``student`` overrides the run's
    ``student.path`` (e.g. the model's hub name instead of a local path)."""
    path = checkpoint_path(checkpoint)
    run = json.loads((path / "config.json").read_text())
    hyper_config = config_from_dict(HyperLoRAConfig, run["hypernetwork"], prefix="hypernetwork.")
    student_path = run["student"]["path"]
    skeleton = student_skeleton(student_path)
    with torch.random.fork_rng(devices=[]):
        adapter = build_hyper_lora(hyper_config, skeleton)
    load_weights(path, adapter)
    return save_hypernetwork(adapter, student or student_path, out, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a training checkpoint's hypernetwork as a directory.")
    parser.add_argument("--checkpoint", required=True, help="a step_* checkpoint, or a directory of them (the latest)")
    parser.add_argument(
        "--out", required=True, type=Path, help="the directory to write (config.json, model.safetensors)"
    )
    parser.add_argument("--student", help="name recorded for the student (default: the run's student.path)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        export_checkpoint(args.checkpoint, args.out, student=args.student, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
