"""Where the registry's schema stands, read without Alembic.

Alembic (with Mako and Pygments behind it) adds about 10 MB to a process, and a broker needs it
only when the schema must change. This module reads the database's revision with plain
SQLAlchemy and this version's head from the packaged revision files, so that a process whose
database is already at head never imports Alembic; anything else goes to Alembic as before.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

from sqlalchemy import column, inspect, select, table
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from provisioning.errors import RegistryUnavailableError

#: Alembic's default version table (``migrations/env.py`` keeps the default name and schema).
VERSION_TABLE = table("alembic_version", column("version_num"))


@cache
def packaged_head() -> str | None:
    """The newest revision this version ships, read from its revision files; None when in doubt."""
    return head_of(files("provisioning.migrations") / "versions")


def head_of(versions: Traversable) -> str | None:
    """The head of the revision files in ``versions`` if they form one line from one base, else None.

    Doubt (a file without plain ``revision`` and ``down_revision`` literals, a merge, a branch) is
    left to Alembic.
    """
    down_of: dict[str, str | None] = {}
    for entry in versions.iterdir():
        if not entry.name.endswith(".py") or entry.name == "__init__.py":
            continue
        names = _constants(entry.read_text(encoding="utf-8"))
        revision, down = names.get("revision"), names.get("down_revision", ...)
        if not isinstance(revision, str) or not isinstance(down, str | None) or revision in down_of:
            return None
        down_of[revision] = down
    heads = set(down_of) - set(down_of.values())
    bases = [revision for revision, down in down_of.items() if down is None]
    if len(heads) != 1 or len(bases) != 1 or len(set(down_of.values())) != len(down_of):
        return None
    return heads.pop()


# ``revision: str = "0005"`` at the start of a line, as Alembic writes it (annotation optional).
_ASSIGNMENT = re.compile(r"^(revision|down_revision)[ \t]*(?::[^=\n]*)?=[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_LITERAL = re.compile(r"""^(?:"([^"\\]*)"|'([^'\\]*)'|(None))$""")
#: Stands for "not a plain literal" (or assigned twice): neither a string nor None.
_DOUBT = object()


def _constants(source: str) -> dict[str, object]:
    """``revision`` and ``down_revision`` of a revision file: a string, None, or a doubt marker.

    Read by pattern, not with :mod:`ast` (whose parser is not safe to run while other threads
    build ASTs on Python 3.11): a value that is not one plain string literal or None is doubt.
    """
    found: dict[str, object] = {}
    for name, value in _ASSIGNMENT.findall(source):
        literal = _LITERAL.match(value)
        if name in found or literal is None:
            found[name] = _DOUBT
        else:
            double, single, none = literal.groups()
            found[name] = None if none else (double if double is not None else single)
    return found


async def stored_revisions(engine: AsyncEngine) -> tuple[str, ...]:
    """The revisions Alembic recorded in the database: none for a database never migrated."""

    def _read(conn: Connection) -> tuple[str, ...]:
        if not inspect(conn).has_table(VERSION_TABLE.name):
            return ()
        return tuple(conn.execute(select(VERSION_TABLE.c.version_num)).scalars())

    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_read)
    except (SQLAlchemyError, OSError) as exc:
        raise RegistryUnavailableError(f"database unavailable: {exc}") from exc


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    revisions = await stored_revisions(engine)
    if len(revisions) > 1:
        raise RegistryUnavailableError(f"database records several revisions: {', '.join(revisions)}")
    return revisions[0] if revisions else None


async def upgrade_if_behind(engine: AsyncEngine) -> tuple[str | None, str]:
    """Migrate the database to head unless it is there already; returns (before, after).

    A database behind head is migrated, one ahead of it (written by a newer mqttprov) is refused,
    both by Alembic exactly as :func:`provisioning.registry.migrate.upgrade` does.
    """
    head = packaged_head()
    if head is not None and await stored_revisions(engine) == (head,):
        return head, head
    # Imported here, not at the top: Alembic is what this module exists to keep out of a process
    # whose database is already at head.
    from provisioning.registry.migrate import upgrade  # noqa: PLC0415

    return await upgrade(engine)
