"""``mqttprov worker``: serve provisioning requests on an external broker."""

from __future__ import annotations

import logging

from broker.cli.bridge import BrokerOption, _address
from broker.cli.common import ConfigOption, run, settings_from
from broker.external import Runner, until_signalled
from broker.external import run_worker as run_registry_worker
from broker.mosquitto.runtime import run_worker as run_mosquitto_worker

_RUNNERS: dict[str, Runner] = {"registry": run_registry_worker, "mosquitto": run_mosquitto_worker}


def worker(config: ConfigOption = None, broker: BrokerOption = None) -> None:
    """Answer provision/request on the external broker (external.credentials: mosquitto or registry).

    "mosquitto": each new password goes to Mosquitto's dynamic security before the reply.

    "registry": the broker asks mqttprov authd, which checks the registry itself.
    """
    settings = settings_from(config)
    address = _address(settings, broker)
    runner = _RUNNERS[settings.external.credentials]
    run(lambda: until_signalled(lambda stop: runner(settings, address, stop, None)), log_level=logging.INFO)
