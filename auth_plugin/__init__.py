"""Device and service-account authentication: bcrypt off the loop, and (soon) the amqtt plugins."""

from auth_plugin.errors import AuthError, UnusablePasswordError
from auth_plugin.hashing import PasswordHasher, generate_password

__all__ = ["AuthError", "PasswordHasher", "UnusablePasswordError", "generate_password"]
