"""What mqttprov keeps in Mosquitto's dynamic security: names, roles, ACLs and markers.

Every client the bridge manages carries ``mqttprov credential <tag>`` in its text description,
where the tag fingerprints the registry's bcrypt hash of the same password: the bridge can then
tell, without any secret, whether Mosquitto holds the credential the registry holds.
"""

from __future__ import annotations

from collections.abc import Iterable

from auth_plugin.principals import credential_tag
from broker.external.mosquitto.dynsec import Acl
from config import Settings
from provisioning.contract import EVENT_PREFIX, REPLY_PREFIX, REQUEST_TOPIC
from provisioning.errors import ProvisioningError
from provisioning.registry import DeviceInfo
from provisioning.topics import TopicRule

WORKER_ROLE = "mqttprov-worker"
DEVICE_ROLE_PREFIX = "mqttprov-device-"
ACCOUNT_ROLE_PREFIX = "mqttprov-account-"
MARKER = "mqttprov credential "

#: ``defaultACLAccess``: nothing is allowed unless a role says so (receiving included, so a
#: role that may subscribe widely still receives only what its ACLs let it receive).
DEFAULT_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


class UnsafeRuleError(ProvisioningError, ValueError):
    """A service-account rule that would reach provisioning replies on an external broker."""

    error_code = "INVALID_TOPIC"


def marker(password_hash: str) -> str:
    """The text description of a managed client holding the credential behind this hash."""
    return MARKER + credential_tag(password_hash)


def tag_of(textdescription: str | None) -> str | None:
    """The credential tag a managed client carries, or None when it is not ours."""
    if textdescription is None or not textdescription.startswith(MARKER):
        return None
    return textdescription[len(MARKER) :]


def device_role(username: str) -> str:
    """The role holding one device's namespace."""
    return DEVICE_ROLE_PREFIX + username


def account_role(name: str) -> str:
    """The role holding one service account's rules."""
    return ACCOUNT_ROLE_PREFIX + name


def device_namespace(settings: Settings, device: DeviceInfo) -> str:
    """The one filter a device may use (``[acl] device_template``), as on the embedded broker."""
    return settings.acl.device_template.format(
        device_id=device.id, username=device.mqtt_username, mac=device.mac
    )


def device_acls(namespace: str) -> list[Acl]:
    """Publish, subscribe and receive inside the namespace; nothing else."""
    return [
        Acl(acltype="publishClientSend", topic=namespace, allow=True),
        Acl(acltype="publishClientReceive", topic=namespace, allow=True),
        Acl(acltype="subscribePattern", topic=namespace, allow=True),
        Acl(acltype="unsubscribePattern", topic=namespace, allow=True),
    ]


def worker_acls(shared_group: str) -> list[Acl]:
    """Take requests (shared or not), send replies and enrolment events."""
    subscriptions = [REQUEST_TOPIC] + ([f"$share/{shared_group}/{REQUEST_TOPIC}"] if shared_group else [])
    return [
        *(Acl(acltype="subscribeLiteral", topic=topic, allow=True) for topic in subscriptions),
        Acl(acltype="publishClientReceive", topic=REQUEST_TOPIC, allow=True),
        Acl(acltype="publishClientSend", topic=REPLY_PREFIX + "+", allow=True),
        Acl(acltype="publishClientSend", topic=EVENT_PREFIX + "+", allow=True),
    ]


def overlaps(first: str, second: str) -> bool:
    """True when some topic name matches both filters."""
    a, b = first.split("/"), second.split("/")
    for index in range(max(len(a), len(b))):
        left = a[index] if index < len(a) else None
        right = b[index] if index < len(b) else None
        if left == "#" or right == "#":
            return True
        if left is None or right is None:
            return False
        if left != right and "+" not in (left, right):
            return False
    return True


def check_external_rules(rules: Iterable[TopicRule]) -> None:
    """Refuse any rule that could reach ``provision/...``: privacy there rests on the broker ACL."""
    for rule in rules:
        if overlaps(rule.filter, REPLY_PREFIX + "#") or overlaps(rule.filter, REQUEST_TOPIC):
            raise UnsafeRuleError(
                f"rule {rule} overlaps provision/: on an external broker no service account may "
                "reach provisioning requests or replies"
            )


def account_acls(rules: Iterable[TopicRule]) -> list[Acl]:
    """The dynamic-security ACLs equivalent to an account's ``--allow`` rules (checked first)."""
    checked = list(rules)
    check_external_rules(checked)
    acls: list[Acl] = []
    for rule in checked:
        if rule.action == "subscribe":
            acls += [
                Acl(acltype="subscribePattern", topic=rule.filter, allow=True),
                Acl(acltype="publishClientReceive", topic=rule.filter, allow=True),
                Acl(acltype="unsubscribePattern", topic=rule.filter, allow=True),
            ]
        else:
            acls.append(Acl(acltype="publishClientSend", topic=rule.filter, allow=True))
    return acls
