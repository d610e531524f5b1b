"""Run the packaged Alembic migrations on the registry's own engine.

Imported only where the schema may change (``mqttprov db``, a start-up whose database is not at
head: :func:`provisioning.registry.revisions.upgrade_if_behind`): Alembic is heavy.
"""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from provisioning.errors import RegistryUnavailableError
from provisioning.registry.engine import WRITE_OPTION
from provisioning.registry.revisions import current_revision

logger = logging.getLogger(__name__)

SCRIPT_LOCATION = "provisioning:migrations"

__all__ = ["SCRIPT_LOCATION", "alembic_config", "current_revision", "head_revision", "upgrade"]


def alembic_config() -> Config:
    """An Alembic config pointing at the migrations inside the installed package."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    return cfg


def head_revision() -> str:
    """The newest revision this version of mqttprov ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise RegistryUnavailableError("no migrations are packaged")
    return head


async def upgrade(engine: AsyncEngine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the database to ``revision``; returns (revision before, revision after)."""
    before = await current_revision(engine)

    def _upgrade(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)

    try:
        async with engine.connect() as plain:
            conn = await plain.execution_options(**{WRITE_OPTION: True})
            async with conn.begin():
                await conn.run_sync(_upgrade)
    except (SQLAlchemyError, OSError) as exc:
        raise RegistryUnavailableError(f"migration failed: {exc}") from exc
    after = await current_revision(engine)
    if after != before:
        logger.info("database migrated from %s to %s", before or "empty", after)
    return before, after or ""
