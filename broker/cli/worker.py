"""``mqttprov worker``: serve provisioning requests on an external broker."""

from __future__ import annotations

from broker.cli.bridge import BrokerOption, _address
from broker.cli.common import ConfigOption, run, settings_from
from broker.external.mosquitto.runtime import run_mosquitto_worker
from broker.external.worker import Runner, run_registry_worker, until_signalled

_RUNNERS: dict[str, Runner] = {"registry": run_registry_worker, "mosquitto": run_mosquitto_worker}


def worker(config: ConfigOption = None, broker: BrokerOption = None) -> None:
    """Answer provision/request on the external broker (external.credentials: mosquitto or registry).

    "mosquitto": each new password goes to Mosquitto's dynamic security before the reply.

    "registry": the broker asks mqttprov authd, which checks the registry itself.
    """
    settings = settings_from(config)
    address = _address(settings, broker)
    runner = _RUNNERS[settings.external.credentials]
    run(lambda: until_signalled(lambda stop: runner(settings, address, stop, None)), log=settings.log)
