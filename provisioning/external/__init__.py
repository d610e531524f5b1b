"""Provisioning on an external broker: a service client that answers ``provision/request`` there."""

from provisioning.external.link import BrokerAddress, ExternalBrokerError, Message, MqttLink, parse_broker_url
from provisioning.external.worker import ProvisioningWorker, identity_of_request, request_filter

__all__ = [
    "BrokerAddress",
    "ExternalBrokerError",
    "Message",
    "MqttLink",
    "ProvisioningWorker",
    "identity_of_request",
    "parse_broker_url",
    "request_filter",
]
