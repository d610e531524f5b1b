"""``python -m tests.bench``: see :mod:`tests.bench.cli`."""

# Spawned children re-import this module as ``__mp_main__``: nothing heavy may happen at import.
if __name__ == "__main__":
    from tests.bench.cli import main

    raise SystemExit(main())
