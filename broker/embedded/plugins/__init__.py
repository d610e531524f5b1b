"""amqtt's plugin shells over mqttprov's services: auth, topic ACL, session hooks, provisioning."""

from broker.embedded.plugins.auth import MqttprovAuthPlugin, MqttprovTopicPlugin
from broker.embedded.plugins.provisioning import ProvisioningPlugin
from broker.embedded.plugins.sessions import SessionHooks

__all__ = ["MqttprovAuthPlugin", "MqttprovTopicPlugin", "ProvisioningPlugin", "SessionHooks"]
