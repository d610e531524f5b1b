"""Finding devices: one filter for the CLI and the HTTP API, pages with an exact total, and a
streamed export of any number of devices.

Every page is ordered by ``(created_at, id)``. A page is found by offset or, for deep pages, by
a cursor (the last row's ``(created_at, id)``), which costs the same at any depth; the export
walks the same keyset in chunks, each in a short transaction of its own, so that exporting
100,000 devices neither holds them in memory nor holds a connection for the whole walk.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select, tuple_

from provisioning.contract import DEVICE_USERNAME_PREFIX
from provisioning.errors import ProvisioningError, RegistryUnavailableError
from provisioning.mac import mac_prefix
from provisioning.registry.labels import MAX_LABELS, LabelKey, LabelValue, labels_of
from provisioning.registry.models import Device, DeviceLabel, DeviceStatus
from provisioning.registry.schemas import DeviceInfo, DevicePage, aware
from provisioning.registry.status_counts import COMPACT_ABOVE, compact, kept_count
from provisioning.registry.transactions import Repository

logger = logging.getLogger(__name__)

#: The largest page anyone may ask for.
MAX_PAGE = 1000
#: Rows an export reads per transaction.
EXPORT_CHUNK = 1000
#: On SQLite a label-filtered page starts from the labelled devices up to this many, else from the
#: devices in page order (see DeviceSearch._labels_drive): either way a few thousand reads at most.
LABELS_DRIVE_MAX = 2000
_ID_PREFIX_MAX = 12  # the hex digits of an id that its username carries


class InvalidFilterError(ProvisioningError, ValueError):
    """A page or a filter that cannot be served (a limit out of range, a damaged cursor)."""

    error_code = "INVALID_FILTER"


AwareTime = Annotated[datetime, AfterValidator(aware)]
SearchText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


class DeviceFilter(BaseModel):
    """Which devices a listing or an export wants; every field given must match (AND).

    ``search`` is a prefix of a MAC in any notation (``AA-BB-C``), of a device id (up to the 12
    hex digits its username carries, or the whole id) or of a username. Times are UTC (a naive
    time is taken as UTC); ``*_from`` is inclusive, ``*_until`` exclusive.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Any of these statuses (none given: every status).
    status: frozenset[DeviceStatus] = frozenset()
    #: Every one of these labels.
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    search: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)] | None = (
        None
    )
    created_from: AwareTime | None = None
    created_until: AwareTime | None = None
    seen_from: AwareTime | None = None
    seen_until: AwareTime | None = None

    def counted_status(self) -> tuple[bool, DeviceStatus | None]:
        """(True, status) when the kept counts answer the total: no filter but one status at most."""
        only_status = self.model_dump(exclude={"status"}, exclude_defaults=True) == {}
        if not only_status or len(self.status) > 1:
            return False, None
        return True, next(iter(self.status), None)

    def labels_only(self) -> bool:
        """True when the filter is labels and nothing else: the labels index alone counts it."""
        return bool(self.labels) and self.model_dump(exclude={"labels"}, exclude_defaults=True) == {}


class DeviceSearch(Repository):
    """Pages and exports of devices by :class:`DeviceFilter` (a base of ``DeviceRegistry``)."""

    async def search_devices(
        self,
        device_filter: DeviceFilter | None = None,
        *,
        limit: int = 50,
        offset: int = 0,
        after: str | None = None,
    ) -> DevicePage:
        """One page of the devices that match, oldest first, and how many match in all.

        ``after``: a page's ``next_cursor``, for the page that follows it (``offset`` then skips
        rows after the cursor). The total is exact: kept by triggers when the filter is at most
        one status, counted otherwise.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidFilterError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")
        if offset < 0:
            raise InvalidFilterError(f"offset must not be negative, not {offset}")
        wanted = device_filter or DeviceFilter()
        counted, status = wanted.counted_status()
        async with self._read() as session:
            # How many devices carry the labels asked for: one read of the labels index, which
            # also tells how the page is best found (see _labels_drive).
            labelled = await session.scalar(_label_count(wanted.labels)) or 0 if wanted.labels else None
            conditions = self._conditions(wanted, drive=self._labels_drive(labelled))
            # Table rows, not ORM objects: a page is read-only, and the identity map only costs.
            query = select(*Device.__table__.columns).where(*conditions)
            if after is not None:
                query = query.where(_after(after))
            query = query.order_by(Device.created_at, Device.id).limit(limit).offset(offset)
            rows = (await session.execute(query)).all()
            labels = await labels_of(session, [r.id for r in rows])
            if counted:
                # Kept by triggers: counting 60,000 devices of one status was most of a page's time.
                total, summed = await kept_count(session, status.value if status is not None else None)
            elif labelled is not None and wanted.labels_only():
                total, summed = labelled, 0  # label rows go with their device: no device row needed
            else:
                counting = self._conditions(wanted, drive=True)
                total, summed = await session.scalar(_count(counting)) or 0, 0
        if summed > COMPACT_ABOVE:
            await self._compact_counts()
        devices = [DeviceInfo.from_row(r, labels.get(r.id)) for r in rows]
        cursor = _cursor(devices[-1]) if len(devices) == limit else None
        return DevicePage(devices=devices, total=total, next_cursor=cursor)

    async def export_devices(
        self, device_filter: DeviceFilter | None = None, *, chunk: int = EXPORT_CHUNK
    ) -> AsyncIterator[DeviceInfo]:
        """Every device that matches, oldest first, read ``chunk`` rows per transaction.

        Not one snapshot: a device added while the export runs appears if it sorts after the
        chunk being read, and one deleted meanwhile may be missing.
        """
        conditions = self._conditions(device_filter or DeviceFilter())
        last: tuple[datetime, uuid.UUID] | None = None
        while True:
            query = select(*Device.__table__.columns).where(*conditions)
            if last is not None:
                query = query.where(tuple_(Device.created_at, Device.id) > tuple_(*last))
            query = query.order_by(Device.created_at, Device.id).limit(chunk)
            async with self._read() as session:
                rows = (await session.execute(query)).all()
                labels = await labels_of(session, [r.id for r in rows])
            for row in rows:
                yield DeviceInfo.from_row(row, labels.get(row.id))
            if len(rows) < chunk:
                return
            last = (rows[-1].created_at, rows[-1].id)

    def _labels_drive(self, labelled: int | None) -> bool:
        """Whether a page starts from the labelled devices (``IN``) rather than from the devices in
        page order, asking each for its labels (``EXISTS``, which stops at a page's worth).

        PostgreSQL's planner chooses between the two itself given ``IN``. SQLite takes ``IN`` as
        "start from the list, then sort it": 40 ms for 10,000 labelled devices of 100,000, where
        ``EXISTS`` takes 2 ms; but ``EXISTS`` reads every device when few carry the label. The
        count of labelled devices, one index read, decides.
        """
        if labelled is None or self.engine.dialect.name == "postgresql":
            return True
        return labelled <= LABELS_DRIVE_MAX

    def _conditions(self, wanted: DeviceFilter, *, drive: bool = True) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if wanted.status:
            conditions.append(Device.status.in_(sorted(s.value for s in wanted.status)))
        for key, value in sorted(wanted.labels.items()):
            # drive: from the (key, value, device_id) index, as many reads as devices match (a count
            # of 10,000 of 100,000 took 200 ms the other way); else one probe per device read.
            labelled = _labelled(key, value)
            conditions.append(
                Device.id.in_(labelled)
                if drive
                else exists(labelled.where(DeviceLabel.device_id == Device.id))
            )
        if wanted.search is not None:
            conditions.append(self._search(wanted.search))
        if wanted.created_from is not None:
            conditions.append(Device.created_at >= wanted.created_from)
        if wanted.created_until is not None:
            conditions.append(Device.created_at < wanted.created_until)
        if wanted.seen_from is not None:
            conditions.append(Device.last_seen_at >= wanted.seen_from)
        if wanted.seen_until is not None:
            conditions.append(Device.last_seen_at < wanted.seen_until)
        return conditions

    def _search(self, text: str) -> ColumnElement[bool]:
        postgres = self.engine.dialect.name == "postgresql"
        matches = [_prefix(Device.mqtt_username, text.lower(), postgres=postgres)]
        mac = mac_prefix(text)
        if mac is not None:
            matches.append(_prefix(Device.mac, mac, postgres=postgres))
        digits = text.replace("-", "").lower()
        try:
            matches.append(Device.id == uuid.UUID(text))
        except ValueError:
            if 0 < len(digits) <= _ID_PREFIX_MAX and all(c in "0123456789abcdef" for c in digits):
                # A username is "device_" and the first 12 hex digits of the id.
                matches.append(
                    _prefix(Device.mqtt_username, DEVICE_USERNAME_PREFIX + digits, postgres=postgres)
                )
        return or_(*matches)

    async def _compact_counts(self) -> None:
        # Best effort: a writer that made many rows without folding them (a bulk import, the CLI
        # with no broker running) must not make every page slower; a read-only database (a
        # standby, a read-only file) keeps its rows, and the total stays exact either way.
        try:
            async with self._write() as session:
                folded = await compact(await session.connection())
        except RegistryUnavailableError as exc:
            logger.info("device status counts not compacted: %s", exc)
            return
        logger.debug("device status counts compacted: %d rows folded", folded)


def _prefix(column: Any, prefix: str, *, postgres: bool) -> ColumnElement[bool]:
    """``column`` starts with ``prefix``, as a range its index serves (no LIKE, nothing to escape).

    The values searched (MACs, usernames) are ASCII, so the range in byte order is exact. On
    PostgreSQL a linguistic collation may not sort by bytes: the pattern operators compare
    bytes, and migration 0009's ``varchar_pattern_ops`` indexes serve them.
    """
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    if postgres:
        return and_(column.op("~>=~")(prefix), column.op("~<~")(upper))
    return and_(column >= prefix, column < upper)


def _count(conditions: list[ColumnElement[bool]]) -> Select[int]:
    return select(func.count()).select_from(Device).where(*conditions)


def _labelled(key: str, value: str) -> Select[uuid.UUID]:
    """The ids of the devices labelled ``key=value``, from the (key, value, device_id) index."""
    return select(DeviceLabel.device_id).where(DeviceLabel.key == key, DeviceLabel.value == value)


def _label_count(labels: Mapping[str, str]) -> Select[int]:
    """How many devices carry every one of ``labels``, counted in the labels index alone."""
    (key, value), *others = sorted(labels.items())
    query = select(func.count()).select_from(DeviceLabel)
    query = query.where(DeviceLabel.key == key, DeviceLabel.value == value)
    return query.where(*(DeviceLabel.device_id.in_(_labelled(k, v)) for k, v in others))


def _cursor(device: DeviceInfo) -> str:
    raw = f"{device.created_at.isoformat()}|{device.id.hex}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(cursor: str) -> ColumnElement[bool]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, hex_id = raw.partition("|")
        key = (aware(datetime.fromisoformat(created)), uuid.UUID(hex=hex_id))
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidFilterError("invalid cursor: pass a page's next_cursor unchanged") from exc
    return tuple_(Device.created_at, Device.id) > tuple_(*key)
