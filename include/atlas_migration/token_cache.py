"""A service-account token shared by every task and trigger poll on one machine, without writing the secret.

Each Airflow task runs in its own process and a deferrable operator's trigger in the triggerer's, so an
in-memory cache lasts one task: a live push asked Atlas for a new token at nearly every call, although a
token is valid for an hour. This cache keeps the token in a file that every process of the machine finds:

- the file name is a SHA-256 of (API base URL, client id, client secret): it says nothing about either, and
  another service account (or another Atlas) has another file;
- the content is the token and its wall-clock expiry, encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under
  a key derived with HKDF-SHA256 from the client secret: reading it requires the secret the reader would
  need to ask Atlas for a token anyway. A file that does not decrypt (another secret, tampering) is ignored;
- the directory is created 0700 and each file written 0600, atomically (a reader never sees half a file).

Where: ``$MIGRATION_TOKEN_CACHE_DIR``, else ``<temp dir>/atlas_migration-tokens-<uid>``. Workers on other
machines keep their own file (each fetches at most one token per hour). A token Atlas refuses is removed, so
no process reuses it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CACHE_DIR_ENV = "MIGRATION_TOKEN_CACHE_DIR"
_INFO = b"atlas_migration service-account token cache v1"


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"atlas_migration-tokens-{os.getuid()}"


class SharedTokenCache:
    """One service account's token, shared through an encrypted file (see the module docstring)."""

    def __init__(self, base_url: str, client_id: str, client_secret: str, *, directory: Path | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        identity = json.dumps([base_url, client_id, client_secret]).encode()
        self.path = (directory or cache_dir()) / (hashlib.sha256(identity).hexdigest() + ".token")
        self._fernet = _fernet(client_secret, salt=hashlib.sha256(json.dumps([base_url, client_id]).encode()).digest())
        self._wall_clock = wall_clock

    def __repr__(self) -> str:
        return f"SharedTokenCache({self.path.name[:12]}...)"

    def load(self, margin: float) -> tuple[str, float] | None:
        """The cached token and its remaining lifetime in seconds, when more than ``margin`` remains."""
        from cryptography.fernet import InvalidToken

        try:
            data = json.loads(self._fernet.decrypt(self.path.read_bytes()))
        except (OSError, InvalidToken, ValueError):
            return None
        remaining = float(data["expires_at"]) - self._wall_clock()
        return (str(data["token"]), remaining) if remaining > margin else None

    def save(self, token: str, expires_in: float) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        payload = self._fernet.encrypt(json.dumps({"token": token,
                                                   "expires_at": self._wall_clock() + expires_in}).encode())
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")  # created 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remove(self, token: str | None = None) -> None:
        """Forget the cached token (only if it is ``token``, when given: another process may have a newer one)."""
        if token is not None:
            cached = self.load(margin=float("-inf"))
            if cached is None or cached[0] != token:
                return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _fernet(secret: str, salt: bytes):
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(secret.encode())
    return Fernet(base64.urlsafe_b64encode(key))
