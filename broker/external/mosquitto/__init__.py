"""Mosquitto as the production broker: dynamic-security bridge, sync, and their assembly."""

from broker.external.mosquitto.bridge import DynsecBridge
from broker.external.mosquitto.dynsec import Acl, ClientInfo, DynsecClient, DynsecError
from broker.external.mosquitto.layout import UnsafeRuleError, check_external_rules
from broker.external.mosquitto.sync import SyncReport, SyncStep, reconcile

__all__ = [
    "Acl",
    "ClientInfo",
    "DynsecBridge",
    "DynsecClient",
    "DynsecError",
    "SyncReport",
    "SyncStep",
    "UnsafeRuleError",
    "check_external_rules",
    "reconcile",
]
