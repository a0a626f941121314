"""Unit tests of the wire codec and the config loader (no server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hyperdistill.common.codec import (
    TopK,
    TopKAssembler,
    bytes_per_position,
    encode_chunks,
    pack_token_ids,
    unpack_token_ids,
)
from hyperdistill.common.config import ConfigError, load_config
from hyperdistill.teacher_service.config import TeacherConfig
from hyperdistill.trainer.config import TrainerConfig

TRAINER_CPU_CONFIG = Path(__file__).parents[1] / "deploy/configs/trainer.cpu.yaml"


def _topk(num: int, k: int, seed: int = 0) -> TopK:
    rng = np.random.default_rng(seed)
    logprobs = -np.sort(rng.exponential(3.0, (num, k)).astype(np.float32), axis=1)
    ids = rng.integers(0, 151936, (num, k), dtype=np.int32)
    return TopK(ids=ids, logprobs=logprobs, target=-rng.exponential(5.0, num).astype(np.float32))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_chunks_round_trip(dtype):
    topk = _topk(1000, 20)
    chunks = list(encode_chunks("r", topk, dtype, max_positions=300))
    assert [c.num_positions for c in chunks] == [300, 300, 300, 100]
    assert [c.last for c in chunks] == [False, False, False, True]
    assembler = TopKAssembler(1000, 20)
    for chunk in reversed(chunks[:-1]):  # order within a request does not matter to the assembler
        assert not assembler.add(chunk)
    assert assembler.add(chunks[-1])
    out = assembler.result()
    np.testing.assert_array_equal(out.ids, topk.ids)
    tol = 0 if dtype == "float32" else 2.0**-11
    np.testing.assert_allclose(out.logprobs, topk.logprobs, rtol=tol, atol=0)
    np.testing.assert_allclose(out.target, topk.target, rtol=tol, atol=0)
    payload = sum(len(c.topk_ids) + len(c.topk_logprobs) + len(c.target_logprobs) for c in chunks)
    assert payload == 1000 * bytes_per_position(20, dtype)


def test_assembler_rejects_misfit_and_short_streams():
    chunks = list(encode_chunks("r", _topk(10, 4), "float32", max_positions=6))
    with pytest.raises(ValueError, match="does not fit"):
        TopKAssembler(5, 4).add(chunks[0])
    with pytest.raises(ValueError, match="ended after 4 of 10"):
        TopKAssembler(10, 4).add(chunks[1])


def test_token_ids_pack_little_endian():
    data = pack_token_ids([1, 256, 151935])
    assert data == b"\x01\x00\x00\x00\x00\x01\x00\x00\x7f\x51\x02\x00"
    np.testing.assert_array_equal(unpack_token_ids(data), [1, 256, 151935])
    with pytest.raises(ValueError, match="not a whole number of int32"):
        unpack_token_ids(b"\x00" * 5)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("engine:\n  model: m\n  max_top_k: 8\nserver:\n  port: 1\n")
    config = load_config(TeacherConfig, path, ["server.port=50052", "engine.kind=hf", "server.grace_seconds=5"])
    assert (config.engine.model, config.engine.max_top_k, config.engine.kind) == ("m", 8, "hf")
    assert config.server.port == 50052 and config.server.grace_seconds == 5.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["engine.modle=x"], "unknown config key.*engine.modle"),
        (["server.port=abc"], "server.port: expected int"),
        (["engine.kind=tgi"], "engine.kind must be one of"),
        (["server.logprob_dtype=bf16"], "server.logprob_dtype must be one of"),
        (["engine.kv_cache_memory_bytes=0"], "engine.kv_cache_memory_bytes must be > 0 bytes when set, got 0"),
        (["engine.kv_cache_memory_bytes=1GiB"], "engine.kv_cache_memory_bytes: expected int"),
        (["server"], "not of the form key.sub=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TeacherConfig, None, ["engine.model=m", *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        ("hypernetwork.rank=0", r"^hypernetwork\.rank must be >= 1, got 0$"),
        ("hypernetwork.experts=3", r"^hypernetwork\.experts must be >= 1 and divide rank"),
        ("optim.grad_clip=0", r"^optim: need accumulation_steps >= 1, grad_clip > 0"),
        ("phases=[{name: main, lr: 0}]", r"^phases\[0\]: phase 'main': need lr > 0"),
        ("data.subset=some", r"^data\.subset must be 'gold' or 'all'"),
        ("student.chat_template=/nonexistent.jinja", r"^student\.chat_template: no such file"),
    ],
)
def test_validator_errors_leave_the_loader_with_their_section(override, message):
    """Validators name their fields bare; the loader adds the dotted path and raises ConfigError."""
    with pytest.raises(ConfigError, match=message):
        load_config(TrainerConfig, TRAINER_CPU_CONFIG, [override])
