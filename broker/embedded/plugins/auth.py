"""Thin amqtt adapters: the auth plugin and the topic plugin over :mod:`auth_plugin`'s services.

Session start and end (presence) are not amqtt events here: the broker calls
:class:`broker.embedded.plugins.sessions.SessionHooks` directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from auth_plugin.acl import Action, allows
from auth_plugin.authenticator import Authenticator, ConnectAttempt
from auth_plugin.logsafe import BurstLog, shown
from auth_plugin.principals import SERVER_UNAVAILABLE, bind_principal, principal_of, set_refusal_code
from provisioning.errors import RegistryUnavailableError

logger = logging.getLogger(__name__)
_refused = BurstLog(logger, "connects refused")
_undecided = BurstLog(logger, "connects not decided", level=logging.WARNING)


class MqttprovAuthPlugin(BaseAuthPlugin):
    """CONNECT: bind a principal to the session, or refuse. Always an explicit True/False."""

    @dataclass
    class Config:
        """The service doing the work (passed in by ``broker.embedded.assembly``)."""

        authenticator: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        """amqtt hook: True to accept the CONNECT, False to refuse it."""
        authenticator: Authenticator = self.config.authenticator
        attempt = ConnectAttempt(
            client_id=session.client_id,
            username=session.username,
            password=session.password,
            will_flag=bool(session.will_flag),
            address=session.remote_address,
            will_topic=session.will_topic,
        )
        try:
            decision = await authenticator.authenticate(attempt)
        except RegistryUnavailableError as exc:
            # Not a refusal of the credential: CONNACK 3, and the device tries again later (a
            # refused login would tell it to provision again).
            bind_principal(session, None)
            set_refusal_code(session, SERVER_UNAVAILABLE)
            _undecided.refused(
                "connect not decided client=%s, answered 3 (try again): %s", shown(session.client_id), exc
            )
            return False
        except Exception:
            # amqtt would only log this at DEBUG; a failing check must be loud and must refuse.
            logger.exception("authentication failed for client %s", shown(session.client_id))
            bind_principal(session, None)
            return False
        bind_principal(session, decision.principal)
        if not decision.accepted:
            set_refusal_code(session, decision.code)
            _refused.refused(
                "connect refused client=%s username=%s address=%s: %s",
                shown(session.client_id),
                shown(session.username),
                session.remote_address,
                decision.reason,
            )
            return False
        return True


class MqttprovTopicPlugin(BaseTopicPlugin):
    """SUBSCRIBE, PUBLISH and RECEIVE checks. Always an explicit True/False."""

    @dataclass
    class Config:
        """No options: the rules come from the principal bound at CONNECT."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Any = None
    ) -> bool:
        """amqtt hook: True when the session may perform ``action`` on ``topic``."""
        if session is None or topic is None or action is None:
            return False
        return self.check(session, topic, action)

    @staticmethod
    def check(session: Session, topic: str, action: Any) -> bool:
        """The same decision, synchronously (the broker's delivery path calls it directly)."""
        try:
            return allows(principal_of(session), topic, Action(str(action)))
        except ValueError:
            return False
