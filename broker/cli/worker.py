"""``mqttprov worker``: serve provisioning requests on an external broker (Mosquitto)."""

from __future__ import annotations

import logging

from broker.cli.bridge import BrokerOption, _address
from broker.cli.common import ConfigOption, run, settings_from
from broker.mosquitto.runtime import run_worker, until_signalled


def worker(config: ConfigOption = None, broker: BrokerOption = None) -> None:
    """Answer provision/request on the external broker; passwords go to Mosquitto before the reply."""
    settings = settings_from(config)
    address = _address(settings, broker)
    run(lambda: until_signalled(lambda stop: run_worker(settings, address, stop)), log_level=logging.INFO)
