"""A registry command loads neither the broker library nor the HTTP server: amqtt and aiohttp are
for ``serve`` and ``authd``, and cost every other command about a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from provisioning.registry import create_engine
from provisioning.registry.migrate import upgrade

# Runs the console script's entry point, then reports which of the heavy libraries were loaded.
_PROBE = """
import json, sys
from broker.cli import main

sys.argv = ["mqttprov", *sys.argv[1:]]
try:
    main()
finally:
    print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & {"amqtt", "aiohttp"})),
          file=sys.stderr)
"""


async def test_devices_list_imports_neither_amqtt_nor_aiohttp(tmp_path: Path, sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, "devices", "list", "--json"],
        cwd=tmp_path,
        env={**os.environ, "MQTTPROV_DATABASE__URL": sqlite_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    *_, loaded = done.stderr.strip().splitlines()
    assert json.loads(loaded) == [], done.stderr
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"] == 0
