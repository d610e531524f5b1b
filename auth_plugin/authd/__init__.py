"""``mqttprov authd``: the HTTP auth service production brokers call, over the embedded plugins' services.

Each broker's callback contract is a thin module (:mod:`.rabbitmq`, :mod:`.emqx`, :mod:`.vernemq`,
:mod:`.goauth`) over :class:`~auth_plugin.authd.service.AuthdService`; :mod:`.app` puts them behind
one fail-closed guard.
"""

from auth_plugin.authd.app import Contract, Route, build_app
from auth_plugin.authd.kicker import CommandKicker
from auth_plugin.authd.metrics import Metrics
from auth_plugin.authd.policy import external_allows
from auth_plugin.authd.service import AuthdRevoker, AuthdService, PrincipalCache

__all__ = [
    "AuthdRevoker",
    "AuthdService",
    "CommandKicker",
    "Contract",
    "Metrics",
    "PrincipalCache",
    "Route",
    "build_app",
    "external_allows",
]
