"""What one session may hold in the broker's subscription table, and the filters it holds.

amqtt 0.12.1 keeps one table, ``{filter: [(session, qos), ...]}``, walked by every publish and
(for retained messages) every CONNECT. A session's own filters are kept on the session too, so
that ending it removes exactly its entries instead of walking the whole table.
"""

from __future__ import annotations

from typing import Any

_FILTERS = "mqttprov.filters"


def held_filters(session: Any) -> set[str]:
    """The filters ``session`` holds in the broker's table (kept on the session, across resumes)."""
    attributes: dict[str, Any] = session.attributes
    found = attributes.get(_FILTERS)
    if not isinstance(found, set):
        found = set()
        attributes[_FILTERS] = found
    return found
