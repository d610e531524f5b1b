"""The verifier key: HMAC-SHA256 verifiers of credentials that passed a bcrypt check.

A verifier is ``HMAC-SHA256(key, username, stored bcrypt hash, password)``. It is kept in the
registry (``credential_verifiers``) so that every process sharing the registry, after a restart
too, checks the next login of that credential with one HMAC instead of bcrypt. The key never
lives in the database: it comes from ``[auth] verifier_key`` (``MQTTPROV_AUTH__VERIFIER_KEY``) or
from a key file created with mode 0600 on first start. Without a usable key, verifiers are off
and every login that the in-memory cache cannot answer is a bcrypt check, as before. Why this is
safe for the passwords this product issues, and its limits: docs/security/verifiers.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from auth_plugin.errors import AuthError
from config import Settings
from provisioning.registry.verifiers import StoredVerifier

logger = logging.getLogger(__name__)

#: Name of the key file made beside an SQLite database when no key is configured.
KEY_FILE_NAME = "mqttprov-verifier.key"
#: What a key file holds: 32 random bytes as 64 hex digits (and a newline); the digits are the key.
_KEY_BYTES = 32
#: Domain separation: a verifier is never equal to any other HMAC made with the same key.
_CONTEXT = b"mqttprov-verifier-v1\x00"


class VerifierKeyError(AuthError):
    """The key file cannot be used; the message says why and what to do, in one line."""


@dataclass(frozen=True)
class VerifierKey:
    """The server key and what is made with it."""

    secret: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        """A fingerprint of the key, stored beside each verifier (it reveals nothing of the key)."""
        return hashlib.sha256(b"mqttprov-verifier-key-id\x00" + self.secret).hexdigest()[:16]

    def digest(self, username: str, password_hash: str, password: str) -> str:
        """The verifier of ``password`` for the credential ``(username, password_hash)``."""
        material = "\x00".join((username, password_hash, password)).encode("utf-8", "surrogatepass")
        return hmac.new(self.secret, _CONTEXT + material, hashlib.sha256).hexdigest()

    def make(self, username: str, password_hash: str, tag: str, password: str) -> StoredVerifier:
        """A verifier to store for a credential that has just passed a bcrypt check."""
        return StoredVerifier(tag, self.key_id, self.digest(username, password_hash, password))

    def matches(self, stored: StoredVerifier, username: str, password_hash: str, password: str) -> bool:
        """True when ``password`` is the one ``stored`` was made for (constant time)."""
        return hmac.compare_digest(stored.digest, self.digest(username, password_hash, password))


def default_key_file(database_url: str) -> Path | None:
    """``mqttprov-verifier.key`` beside an SQLite database file; None for any other database.

    A PostgreSQL registry is shared by processes on several hosts, which must all use one key:
    they are given it (``verifier_key``, or a ``verifier_key_file`` they share), never a key
    made up on each host.
    """
    try:
        url = make_url(database_url)
    except (ArgumentError, ValueError):
        return None
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).parent / KEY_FILE_NAME


def load_verifier_key(settings: Settings) -> VerifierKey | None:
    """The key from the settings, else from its file (created on first start); None when off.

    Never raises for a key file that cannot be used: it logs one ERROR line saying why and how
    to mend it, and verifiers stay off (every login is checked with bcrypt, none is accepted on
    a verifier made under another key).
    """
    auth = settings.auth
    if not auth.verifiers:
        return None
    if auth.verifier_key is not None:
        return VerifierKey(auth.verifier_key.get_secret_value().encode("utf-8"))
    path = auth.verifier_key_file or default_key_file(settings.database.url)
    if path is None:
        logger.warning(
            "credential verifiers are off: a registry that is not an SQLite file needs a key shared "
            "by every process (MQTTPROV_AUTH__VERIFIER_KEY or [auth] verifier_key_file); until then "
            "every login after a restart is a bcrypt check"
        )
        return None
    try:
        return VerifierKey(read_or_create_key_file(path))
    except VerifierKeyError as exc:
        logger.error("credential verifiers are off, every login is checked with bcrypt: %s", exc)  # noqa: TRY400 - one line, no traceback
        return None


def read_or_create_key_file(path: Path) -> bytes:
    """The key in ``path``; a new random key written there (mode 0600) if the file does not exist.

    The file holds 64 hex digits, and those characters are the key: giving the same text as
    ``verifier_key`` (to a process on another host, or after a move to PostgreSQL) is the same key.
    """
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _read_key_file(path)
    except OSError as exc:
        raise VerifierKeyError(f"cannot create the key file {path}: {exc.strerror}") from exc
    key = secrets.token_hex(_KEY_BYTES)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(key + "\n")
    logger.info(
        "created the credential verifier key %s (mode 0600); every process on this registry must use it",
        path,
    )
    return key.encode("ascii")


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                shown = f"{stat.S_IMODE(mode):04o}"
                raise VerifierKeyError(
                    f"the key file {path} is open to other users (mode {shown}): run `chmod 600 {path}`"
                )
            text = fh.read(4 * _KEY_BYTES).decode("ascii", "replace").strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise VerifierKeyError(f"cannot read the key file {path}: {exc.strerror}") from exc
    if len(text) != 2 * _KEY_BYTES or text.strip(string.hexdigits):
        raise VerifierKeyError(f"the key file {path} does not hold {_KEY_BYTES * 2} hex digits")
    # The text itself is the key: the same text given as verifier_key is the same key.
    return text.encode("ascii")
