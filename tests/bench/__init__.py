"""Benchmarks of issue 7 (``python -m tests.bench.run``). Not collected by pytest: no ``test_*`` modules."""
