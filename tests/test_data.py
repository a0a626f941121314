"""trainer.data on the SWE-rebench fixture: decoding, rendering, masks, truncation, skips,
the on-disk dataset and its summary, and the prepare_data CLI."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.trainer import data
from hyperdistill.trainer.data import DataConfig, prepare, render
from hyperdistill.trainer.data import __main__ as data_cli
from hyperdistill.trainer.data import rows as source_rows
from hyperdistill.trainer.data.rows import BadRow
from tests.fixtures import make_swe_rebench_sample

FIXTURE = Path(__file__).parent / "fixtures" / "swe_rebench_sample.jsonl"
COLUMNS = {
    "trajectory_id",
    "instance_id",
    "repo",
    "trajectory",
    "tools",
    "model_patch",
    "exit_status",
    "resolved",
    "gen_tests_correct",
    "pred_passes_gen_tests",
}
MAX_LENGTH = 8192
# The fixture's malformed rows (see tests/fixtures/make_swe_rebench_sample.py) and the
# reason each must be skipped for.
MALFORMED = {
    "malformed.missing_tools": source_rows.MISSING_FIELD,
    "malformed.bad_arguments": source_rows.BAD_ARGUMENTS,
    "malformed.arguments_not_object": source_rows.BAD_ARGUMENTS,
    "malformed.unknown_role": source_rows.UNKNOWN_ROLE,
    "malformed.empty_trajectory": source_rows.EMPTY_TRAJECTORY,
    "malformed.no_user_message": source_rows.NO_USER_MESSAGE,
    "malformed.user_content_null": source_rows.MISSING_FIELD,
}
HUGE_PROMPT = "celery__kombu-1820.run1"  # its prompt alone is longer than MAX_LENGTH
LONG = "python-attrs__attrs-1144.run1"  # longer than MAX_LENGTH: truncated


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(tiny_models.student)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def well_formed(rows) -> list[dict]:
    return [r for r in rows if r["trajectory_id"] not in MALFORMED]


def config(tmp: Path, **overrides) -> DataConfig:
    fields = dict(source=str(FIXTURE), max_length=MAX_LENGTH, token_budget=MAX_LENGTH, cache_dir=str(tmp / "cache"))
    return DataConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer):
    """(summary, dataset) of the gold subset of the fixture at MAX_LENGTH."""
    tmp = tmp_path_factory.mktemp("prepared")
    summary = prepare.prepare(config(tmp), tokenizer, tmp / "out")
    return summary, datasets.load_from_disk(str(tmp / "out"))


def test_fixture_has_the_dataset_schema_and_variety(rows, well_formed):
    assert len(well_formed) >= 20
    assert all(set(r) == COLUMNS for r in well_formed)
    assert {r["resolved"] for r in well_formed} == {0, 1}
    calls = [m["tool_calls"] for r in well_formed for m in r["trajectory"] if m.get("tool_calls")]
    assert all(isinstance(c["function"]["arguments"], str) for turn in calls for c in turn)
    assert max(len(turn) for turn in calls) >= 3
    roles = {m["role"] for r in well_formed for m in r["trajectory"]}
    assert roles == {"system", "user", "assistant", "tool"}
    assert {r["trajectory_id"] for r in rows} >= set(MALFORMED)


def test_fixture_file_is_what_its_generator_writes(rows):
    assert rows == make_swe_rebench_sample.build_rows()


def expected_assistant_text(message: dict) -> str:
    """What the Qwen3-Coder format makes of an assistant message, written independently
    of the template: content, then each tool call as XML, then <|im_end|>."""
    parts = [message["content"]] if message.get("content") else []
    for call in message.get("tool_calls") or []:
        function = call["function"]
        arguments = json.loads(function["arguments"])
        values = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in arguments.items()}
        params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
        parts.append(f"<tool_call>\n<function={function['name']}>\n{params}</function>\n</tool_call>")
    return "\n".join(parts) + "<|im_end|>"


def mask_spans(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def test_loss_mask_is_exactly_the_assistant_turns(tokenizer, well_formed):
    for row in well_formed:
        messages, tools = source_rows.decode_row(row)
        example = render.render_trajectory(messages, tools, tokenizer, max_length=10**6)
        ids, mask = example["input_ids"], example["loss_mask"]
        spans = [tokenizer.decode(ids[a:b]) for a, b in mask_spans(mask)]
        expected = [expected_assistant_text(m) for m in row["trajectory"] if m["role"] == "assistant"]
        assert spans == expected, row["trajectory_id"]
        # Nothing else is masked: every tool output and user message lies outside the spans.
        unmasked = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
        for m in row["trajectory"]:
            if m["role"] in ("system", "user", "tool"):
                assert m["content"] in unmasked


def test_prompt_is_system_and_first_user_message_and_a_prefix(tokenizer, well_formed):
    for row in well_formed:
        messages, tools = source_rows.decode_row(row)
        example = render.render_trajectory(messages, tools, tokenizer, max_length=10**6)
        prompt = example["prompt_ids"]
        assert example["input_ids"][: len(prompt)] == prompt
        assert not any(example["loss_mask"][: len(prompt)])
        text = tokenizer.decode(prompt)
        system, user = row["trajectory"][0]["content"], row["trajectory"][1]["content"]
        assert text.startswith(f"<|im_start|>system\n{system}\n\n# Tools")
        assert text.endswith(f"<|im_start|>user\n{user}<|im_end|>\n")
        assert text.count("<|im_start|>") == 2


def test_truncation_keeps_the_start_and_the_whole_prompt(tokenizer, well_formed):
    row = next(r for r in well_formed if r["trajectory_id"] == LONG)
    messages, tools = source_rows.decode_row(row)
    full = render.render_trajectory(messages, tools, tokenizer, max_length=10**6)
    cut = render.render_trajectory(messages, tools, tokenizer, max_length=MAX_LENGTH)
    assert full["length"] > MAX_LENGTH == cut["length"] == len(cut["input_ids"]) == len(cut["loss_mask"])
    assert cut["input_ids"] == full["input_ids"][:MAX_LENGTH]
    assert cut["loss_mask"] == full["loss_mask"][:MAX_LENGTH]
    assert cut["prompt_ids"] == full["prompt_ids"]
    assert cut["full_length"] == full["length"]


def test_prompt_longer_than_the_limit_is_skipped(tokenizer, well_formed):
    row = next(r for r in well_formed if r["trajectory_id"] == HUGE_PROMPT)
    messages, tools = source_rows.decode_row(row)
    prompt_length = render.render_trajectory(messages, tools, tokenizer, max_length=10**6)["prompt_length"]
    assert prompt_length > MAX_LENGTH
    with pytest.raises(BadRow) as bad:
        render.render_trajectory(messages, tools, tokenizer, max_length=prompt_length - 1)
    assert bad.value.reason == source_rows.PROMPT_TOO_LONG
    # Room for the prompt and the next turn's header (`<|im_start|>assistant\n`), not one
    # assistant token: nothing to train on.
    with pytest.raises(BadRow) as bad:
        render.render_trajectory(messages, tools, tokenizer, max_length=prompt_length + 3)
    assert bad.value.reason == source_rows.NO_ASSISTANT_TOKENS
    assert render.render_trajectory(messages, tools, tokenizer, max_length=prompt_length + 4)["loss_mask"][-1]


def test_malformed_rows_are_rejected_with_their_reason(rows):
    for row in rows:
        if row["trajectory_id"] in MALFORMED:
            with pytest.raises(BadRow) as bad:
                source_rows.decode_row(row)
            assert bad.value.reason == MALFORMED[row["trajectory_id"]], row["trajectory_id"]


def test_decode_accepts_json_strings(well_formed):
    for row in well_formed:
        encoded = {**row, "trajectory": json.dumps(row["trajectory"]), "tools": json.dumps(row["tools"])}
        assert source_rows.decode_row(encoded) == source_rows.decode_row(row)
    with pytest.raises(BadRow, match=source_rows.BAD_JSON):
        source_rows.decode_row({**row, "trajectory": '[{"role": "user"'})


def test_decode_accepts_arrow_structs(tmp_path, well_formed):
    """Parquet with nested structs: every struct carries the union of all fields (nulls)."""
    pq.write_table(pa.Table.from_pylist(well_formed), tmp_path / "rows.parquet")
    loaded = source_rows.load_source(config(tmp_path, source=str(tmp_path / "rows.parquet")))
    assert loaded.num_rows == len(well_formed)
    for row, struct_row in zip(well_formed, loaded, strict=True):
        assert source_rows.decode_row(struct_row) == source_rows.decode_row(row)


def test_prepare_counts_kept_and_skipped_rows(prepared, rows):
    summary, dataset = prepared
    gold = [r for r in rows if r.get("resolved") == 1 and r["trajectory_id"] not in MALFORMED]
    expected_skips = {
        source_rows.NOT_RESOLVED: sum(r.get("resolved") == 0 for r in rows),
        source_rows.PROMPT_TOO_LONG: 1,
    }
    for reason in MALFORMED.values():
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert summary.rows == len(rows)
    assert summary.skipped == dict(sorted(expected_skips.items()))
    assert set(summary.skipped) <= set(source_rows.SKIP_REASONS)
    assert summary.kept == len(dataset) == len(gold) - 1 == summary.rows - sum(summary.skipped.values())
    assert set(dataset["trajectory_id"]) == {r["trajectory_id"] for r in gold} - {HUGE_PROMPT}
    assert summary.truncated == 1
    assert summary.skipped_examples[source_rows.PROMPT_TOO_LONG] == [HUGE_PROMPT]


def test_prepared_dataset_columns_and_summary(prepared, tmp_path):
    summary, dataset = prepared
    assert dataset.features == datasets.Features(render.STORED_FEATURES)
    lengths = np.asarray(dataset["length"])
    assert [len(ids) for ids in dataset["input_ids"]] == lengths.tolist()
    assert [len(mask) for mask in dataset["loss_mask"]] == lengths.tolist()
    assert lengths.max() == MAX_LENGTH == summary.length["max"]
    assert summary.tokens == lengths.sum()
    assert summary.assistant_tokens == sum(sum(m) for m in dataset["loss_mask"])
    assert 0 < summary.assistant_share < 1 and summary.tokens_per_second > 0
    for example in dataset:
        assert example["input_ids"][: len(example["prompt_ids"])] == example["prompt_ids"]
    saved = Path(dataset.cache_files[0]["filename"]).parent
    assert json.loads((saved / prepare.SUMMARY_FILE).read_text()) == asdict(summary)
    assert prepare.load_summary(saved) == summary


def test_all_subset_with_workers_matches_gold(prepared, tmp_path, tokenizer, rows):
    """`all` keeps the unresolved rows; two worker processes give the same examples."""
    _, gold = prepared
    summary = prepare.prepare(config(tmp_path, subset="all", num_proc=2), tokenizer, tmp_path / "all")
    everything = datasets.load_from_disk(str(tmp_path / "all"))
    assert source_rows.NOT_RESOLVED not in summary.skipped
    unresolved = {r["trajectory_id"] for r in rows if r.get("resolved") == 0}
    assert unresolved <= set(everything["trajectory_id"])
    by_id = {e["trajectory_id"]: e for e in everything}
    for example in gold:
        assert by_id[example["trajectory_id"]] == example


def test_load_prepared_prepares_once_per_setting(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare, "tokenizer_fingerprint", lambda tokenizer: "fingerprint")  # ~1 s per call
    cfg = config(tmp_path, max_length=4096, token_budget=4096)
    first = prepare.load_prepared(cfg, tokenizer)
    assert prepare.prepared_dir(cfg, tokenizer).is_dir()
    monkeypatch.setattr(prepare, "prepare", lambda *a: pytest.fail("prepared again"))
    assert prepare.load_prepared(cfg, tokenizer)["trajectory_id"] == first["trajectory_id"]
    other = config(tmp_path, max_length=4095, token_budget=4096)
    assert prepare.prepared_dir(other, tokenizer) != prepare.prepared_dir(cfg, tokenizer)


def test_hub_names_and_local_files_share_load_dataset(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)))
    source_rows.load_source(config(tmp_path, source=data.HUB_DATASET, split="train"))
    source_rows.load_source(config(tmp_path))
    cache = str(tmp_path / "cache" / "hf")
    assert calls == [
        ((data.HUB_DATASET,), {"split": "train", "cache_dir": cache}),
        (("json",), {"data_files": {"train": [str(FIXTURE)]}, "split": "train", "cache_dir": cache}),
    ]
    with pytest.raises(FileNotFoundError):
        source_rows.load_source(config(tmp_path, source=str(tmp_path / "missing.parquet")))


def test_template_without_generation_blocks_is_refused(tokenizer):
    render.check_chat_template(tokenizer)
    with pytest.raises(ValueError, match="generation"):
        render.check_chat_template(SimpleNamespace(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"))


def test_config_validation():
    with pytest.raises(ValueError, match="subset"):
        DataConfig(subset="resolved")
    with pytest.raises(ValueError, match="token_budget"):
        DataConfig(max_length=4096, token_budget=2048)


def test_cli_prints_and_saves_the_summary(tmp_path, tiny_models, capsys):
    out = tmp_path / "prepared"
    data_cli.main(
        [
            "--tokenizer",
            str(tiny_models.student),
            "--source",
            str(FIXTURE),
            "--out",
            str(out),
            "--max-length",
            str(MAX_LENGTH),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    printed = capsys.readouterr().out
    summary = prepare.load_summary(out)
    assert f"prepared {summary.kept} of {summary.rows} rows" in printed
    assert re.search(rf"prompt_too_long +1  e\.g\. {re.escape(HUGE_PROMPT)}\n", printed)
    assert "tokens/s" in printed
    assert len(datasets.load_from_disk(str(out))) == summary.kept
