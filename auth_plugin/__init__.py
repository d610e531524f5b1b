"""Device, provisioning-session and service-account authentication and the topic ACL for amqtt."""

from auth_plugin.errors import AuthError

__all__ = ["AuthError"]
