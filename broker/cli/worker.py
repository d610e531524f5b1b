"""``mqttprov worker``: serve provisioning requests on an external broker."""

from __future__ import annotations

from broker.cli.bridge import BrokerOption, _address
from broker.cli.common import ConfigOption, run, settings_from


def worker(config: ConfigOption = None, broker: BrokerOption = None) -> None:
    """Answer provision/request on the external broker (external.credentials: mosquitto or registry).

    "mosquitto": each new password goes to Mosquitto's dynamic security before the reply.

    "registry": the broker asks mqttprov authd, which checks the registry itself.
    """
    from broker.core import run_main_until_signalled  # noqa: PLC0415
    from broker.external import Runner, run_mosquitto_worker, run_registry_worker  # noqa: PLC0415

    runners: dict[str, Runner] = {"registry": run_registry_worker, "mosquitto": run_mosquitto_worker}
    settings = settings_from(config)
    address = _address(settings, broker)
    runner = runners[settings.external.credentials]
    run(
        lambda: run_main_until_signalled(lambda stop: runner(settings, address, stop, None)), log=settings.log
    )
