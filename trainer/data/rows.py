"""Source rows: load the dataset and decode each row into messages and tools, or `BadRow`."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from hyperdistill.trainer.data import DataConfig

log = logging.getLogger(__name__)


LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


ROLES = ("system", "user", "assistant", "tool")


NOT_RESOLVED = "not_resolved"


MISSING_FIELD = "missing_field"


BAD_JSON = "bad_json"


BAD_MESSAGE = "bad_message"


BAD_ARGUMENTS = "bad_arguments"


UNKNOWN_ROLE = "unknown_role"


EMPTY_TRAJECTORY = "empty_trajectory"


NO_USER_MESSAGE = "no_user_message"


RENDER_ERROR = "render_error"


PROMPT_TOO_LONG = "prompt_too_long"


NO_ASSISTANT_TOKENS = "no_assistant_tokens"


SKIP_REASONS = (
    NOT_RESOLVED,
    MISSING_FIELD,
    BAD_JSON,
    BAD_MESSAGE,
    BAD_ARGUMENTS,
    UNKNOWN_ROLE,
    EMPTY_TRAJECTORY,
    NO_USER_MESSAGE,
    RENDER_ERROR,
    PROMPT_TOO_LONG,
    NO_ASSISTANT_TOKENS,
)


class BadRow(Exception):
    """A row that cannot become a training example; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_source(config: DataConfig) -> datasets.Dataset:
    """The raw dataset: `load_dataset(name, split=...)` for a hub name, the `json`/`parquet`
    builder on `data_files` for local files."""
    cache = str(Path(config.cache_dir) / "hf")
    files = local_files(config.source)
    if files is None:
        return datasets.load_dataset(config.source, split=config.split, cache_dir=cache)
    builder = LOCAL_BUILDERS[files[0].suffix]
    data_files = {config.split: [str(f) for f in files]}
    return datasets.load_dataset(builder, data_files=data_files, split=config.split, cache_dir=cache)


def local_files(source: str) -> list[Path] | None:
    """The local data files `source` names (a file or a directory), None for a hub name."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_BUILDERS)
    elif path.is_file():
        files = [path]
    elif path.suffix in LOCAL_BUILDERS:
        raise FileNotFoundError(f"data source {source} does not exist")
    else:
        return None
    builders = {LOCAL_BUILDERS.get(f.suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"data source {source}: expected .jsonl or .parquet files of one kind, got {files}")
    return files


def decode_row(row: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """(messages, tools) of one dataset row, ready for `apply_chat_template`.

    Accepts `trajectory`/`tools` as nested lists/structs or as JSON strings. Messages keep
    only the fields the template reads; tool-call arguments become mappings. Raises
    `BadRow` for anything that is not a well-formed trajectory with a prompt.
    """
    for name in ("trajectory_id", "trajectory", "tools"):
        if row.get(name) is None:
            raise BadRow(MISSING_FIELD, name)
    raw_tools = row["tools"]
    # Arrow struct columns give every struct the union of all structs' fields, the
    # missing ones as null: drop those so each tool schema renders as it was written.
    tools = _json_list(raw_tools, "tools")
    if not isinstance(raw_tools, str):
        tools = [_drop_nulls(tool) for tool in tools]
    messages = [_decode_message(m) for m in _json_list(row["trajectory"], "trajectory")]
    if not messages:
        raise BadRow(EMPTY_TRAJECTORY)
    prompt_end(messages)
    return messages, tools


def _loads(text: str, reason: str, what: str) -> Any:
    """json.loads, or BadRow(reason) naming `what` and the parser's message."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow(reason, f"{what}: {e}") from None


def _json_list(value: Any, name: str) -> list:
    if isinstance(value, str):
        value = _loads(value, BAD_JSON, name)
    if not isinstance(value, list):
        raise BadRow(BAD_JSON, f"{name} is a {type(value).__name__}, not a list")
    return value


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _decode_message(raw: Any) -> dict:
    """One message with the fields of its role; tool-call arguments parsed."""
    if not isinstance(raw, Mapping):
        raise BadRow(BAD_MESSAGE, f"message is a {type(raw).__name__}")
    role = raw.get("role")
    if role is None:
        raise BadRow(MISSING_FIELD, "role")
    if role not in ROLES:
        raise BadRow(UNKNOWN_ROLE, repr(role))
    content = raw.get("content")
    if content is None and role != "assistant":
        raise BadRow(MISSING_FIELD, f"{role}.content")
    if content is not None and not isinstance(content, str):
        raise BadRow(BAD_MESSAGE, f"{role}.content is a {type(content).__name__}")
    message = {"role": role, "content": content or ""}
    if role == "assistant" and raw.get("tool_calls"):
        message["tool_calls"] = [_decode_tool_call(call) for call in raw["tool_calls"]]
    if role == "tool":
        message.update({k: raw[k] for k in ("name", "tool_call_id") if raw.get(k) is not None})
    return message


def _decode_tool_call(raw: Any) -> dict:
    function = raw.get("function") if isinstance(raw, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise BadRow(BAD_MESSAGE, "tool call without function.name")
    arguments = function.get("arguments")
    if arguments is None:
        raise BadRow(MISSING_FIELD, "tool_calls.function.arguments")
    if isinstance(arguments, str):
        arguments = _loads(arguments, BAD_ARGUMENTS, function["name"])
    if not isinstance(arguments, Mapping):
        raise BadRow(BAD_ARGUMENTS, f"{function['name']}: arguments are a {type(arguments).__name__}")
    call = {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}
    if raw.get("id") is not None:
        call["id"] = raw["id"]
    return call


def check_resolved(row: Mapping[str, Any]) -> None:
    resolved = row.get("resolved")
    if resolved is None:
        raise BadRow(MISSING_FIELD, "resolved")
    if resolved != 1:
        raise BadRow(NOT_RESOLVED)


def prompt_end(messages: list[dict]) -> int:
    """Number of leading messages in the hypernetwork prompt: the system messages and the
    first user message. Raises `BadRow` if an assistant or tool message comes first."""
    for i, message in enumerate(messages):
        if message["role"] == "user":
            return i + 1
        if message["role"] != "system":
            break
    raise BadRow(NO_USER_MESSAGE)
