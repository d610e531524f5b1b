"""The benchmark suite: ``python -m tests.bench [--quick] [--json FILE] [--only NAME] [--plot DIR]``.

Every figure runs our broker and its reference interleaved, with the same client code, each
broker and each load generator in a process of its own. See ``docs/benchmarks.md``.
"""

__all__: list[str] = []
