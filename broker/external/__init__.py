"""External brokers: the provisioning worker on any MQTT broker, and the Mosquitto bridge."""

from broker.external.mosquitto.runtime import run_bridge, run_mosquitto_worker
from broker.external.worker import Runner, broker_address, run_registry_worker

__all__ = [
    "Runner",
    "broker_address",
    "run_bridge",
    "run_mosquitto_worker",
    "run_registry_worker",
]
