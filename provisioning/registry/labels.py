"""Device labels: ``key=value`` pairs that operators attach to devices to group and find them.

The charset is conservative so that a label reads the same in a shell, a URL query, a CSV cell
and a log line, with no quoting:

- a key is 1-63 characters of lowercase ASCII letters, digits, ``.``, ``_``, ``-`` and ``/``,
  starting with a letter or a digit (``site``, ``fleet/region``);
- a value is 1-63 characters of ASCII letters, digits, ``.``, ``_``, ``-``, ``:`` and ``/``
  (``berlin``, ``2024-05``, ``rack:r12``);
- a device has at most :data:`MAX_LABELS` labels.

Neither may hold ``=``, ``;``, ``,``, whitespace or anything a shell or a query string would
need to escape: ``k=v`` and ``k=v;k2=v2`` are unambiguous wherever they are written.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated

from pydantic import AfterValidator
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from provisioning.errors import ProvisioningError
from provisioning.registry.models import DeviceLabel

LABEL_KEY_MAX = 63
LABEL_VALUE_MAX = 63
#: Labels one device may carry: enough to group by, too few to turn labels into a data store.
MAX_LABELS = 32
_KEY = re.compile(rf"[a-z0-9][a-z0-9._/-]{{0,{LABEL_KEY_MAX - 1}}}")
_VALUE = re.compile(rf"[A-Za-z0-9._:/-]{{1,{LABEL_VALUE_MAX}}}")
_SHOWN = 40


class InvalidLabelError(ProvisioningError, ValueError):
    """A label key or value is not in the accepted charset, or a device would carry too many."""

    error_code = "INVALID_LABEL"


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def validate_label_key(key: str) -> str:
    """``key`` if it is a valid label key, else :class:`InvalidLabelError`."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidLabelError(
            f"invalid label key {_shown(str(key))}: 1-{LABEL_KEY_MAX} lowercase letters, digits, "
            "'.', '_', '-' or '/', starting with a letter or digit"
        )
    return key


def validate_label_value(value: str) -> str:
    """``value`` if it is a valid label value, else :class:`InvalidLabelError`."""
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        raise InvalidLabelError(
            f"invalid label value {_shown(str(value))}: 1-{LABEL_VALUE_MAX} letters, digits, "
            "'.', '_', '-', ':' or '/'"
        )
    return value


#: Pydantic types for the boundary (an HTTP body, a filter): validated as above.
LabelKey = Annotated[str, AfterValidator(validate_label_key)]
LabelValue = Annotated[str, AfterValidator(validate_label_value)]


def parse_label(text: str) -> tuple[str, str]:
    """``"key=value"`` as ``(key, value)``, both validated."""
    key, sep, value = text.strip().partition("=")
    if not sep:
        raise InvalidLabelError(f"invalid label {_shown(text)}: write it as key=value")
    return validate_label_key(key), validate_label_value(value)


def parse_labels(texts: Iterable[str]) -> dict[str, str]:
    """Several ``key=value`` as a mapping; a key given twice is refused (which one was meant?)."""
    labels: dict[str, str] = {}
    for text in texts:
        key, value = parse_label(text)
        if key in labels and labels[key] != value:
            raise InvalidLabelError(f"label key {key!r} is given twice")
        labels[key] = value
    return labels


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``labels`` with every key and value validated and the count within the cap."""
    checked = {validate_label_key(k): validate_label_value(v) for k, v in labels.items()}
    if len(checked) > MAX_LABELS:
        raise InvalidLabelError(f"a device carries at most {MAX_LABELS} labels, not {len(checked)}")
    return checked


async def labels_of(
    session: AsyncSession, device_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, str]]:
    """The labels of each of these devices (one query; devices without labels are absent)."""
    if not device_ids:
        return {}
    query = (
        select(DeviceLabel.device_id, DeviceLabel.key, DeviceLabel.value)
        .where(DeviceLabel.device_id.in_(device_ids))
        .order_by(DeviceLabel.device_id, DeviceLabel.key)
    )
    found: dict[uuid.UUID, dict[str, str]] = {}
    for device_id, key, value in (await session.execute(query)).all():
        found.setdefault(device_id, {})[key] = value
    return found


async def labels_for(session: AsyncSession, device_id: uuid.UUID) -> dict[str, str]:
    """One device's labels."""
    return (await labels_of(session, [device_id])).get(device_id, {})


async def change_labels(
    session: AsyncSession, device_id: uuid.UUID, labels: Mapping[str, str], remove: Iterable[str]
) -> dict[str, str]:
    """Set ``labels`` and delete the keys ``remove`` of one device, in the caller's transaction
    (which holds the device's row); returns the device's labels afterwards."""
    removed = {validate_label_key(key) for key in remove}
    labels = {validate_label_key(k): validate_label_value(v) for k, v in labels.items()}
    both = sorted(removed & labels.keys())
    if both:
        raise InvalidLabelError(f"label key {both[0]!r} is both set and removed")
    gone = removed | labels.keys()
    if gone:
        await session.execute(
            delete(DeviceLabel).where(DeviceLabel.device_id == device_id, DeviceLabel.key.in_(gone))
        )
    if labels:
        kept = await session.scalar(
            select(func.count()).select_from(DeviceLabel).where(DeviceLabel.device_id == device_id)
        )
        if (kept or 0) + len(labels) > MAX_LABELS:
            raise InvalidLabelError(
                f"a device carries at most {MAX_LABELS} labels, not {(kept or 0) + len(labels)}"
            )
        await session.execute(
            insert(DeviceLabel), [{"device_id": device_id, "key": k, "value": v} for k, v in labels.items()]
        )
    return await labels_for(session, device_id)
