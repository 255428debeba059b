"""The registry of the grid: its secure elements and the nodes hosting them, which
identity each is bound to, the keys generated in them, who may administer them, revoked
certificates, the access-token jti replay cache, and the audit rows.

`Registry` is the interface the service and the CLI use; `open_registry` opens one from a
location: a filesystem path (SQLite, the embedded default) or a `postgresql://` URL
(PostgreSQL, shared by several grid nodes). Schemas are versioned (`migrations/`,
`p11grid db upgrade`). Identities are SPIFFE URIs (spiffe://<trust-domain>/vm/<name>) or,
for callers whose certificate carries none, the certificate's CN. docs/registry.md has
the operator's view.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from grid_backend.registry.core import (
    AuditRow,
    ElementNotRegistered,
    ElementRecord,
    IdentityRecord,
    KeyRecord,
    Registry,
    RegistryError,
    RevocationRecord,
    identity_kind,
)
from grid_backend.registry.sqlite import SqliteDatabase, SqliteRegistry

DEFAULT_REGISTRY = "/var/lib/p11grid/registry.sqlite"

__all__ = ["DEFAULT_REGISTRY", "AuditRow", "ElementNotRegistered", "ElementRecord",
           "IdentityRecord", "KeyRecord", "Registry", "RegistryError", "RevocationRecord",
           "SqliteRegistry", "display", "identity_kind", "is_postgres", "open_database",
           "open_registry", "registry_location"]


def registry_location(given: str | Path | None) -> str:
    """The registry the commands use: `given` (--registry), else $P11GRID_REGISTRY, else
    the default SQLite file."""
    return str(given or os.environ.get("P11GRID_REGISTRY") or DEFAULT_REGISTRY)


def is_postgres(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def display(location: str | Path) -> str:
    """The location as it may be printed: a URL without its password (libpq takes one
    in the user part and as a `password` parameter)."""
    if not is_postgres(location):
        return str(location)
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(str(location))
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}@{host}"
    # The query as written (not re-encoded), less any password parameter (whose name
    # libpq decodes: pass%77ord is one too).
    query = "&".join(item for item in parts.query.split("&")
                     if unquote(item.split("=", 1)[0]) != "password")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def open_registry(location: str | Path, node: str = "") -> Registry:
    """The registry at `location`, seen from grid node `node` (which scopes `elements()`
    and `element()`). RegistryError if it cannot be opened, or if its schema is not the
    one this code knows (the message says which command to run); a brand-new SQLite file
    is created at the current schema."""
    if is_postgres(location):
        from grid_backend.registry.postgres import PostgresRegistry  # psycopg only if used

        return PostgresRegistry(str(location), node)
    return SqliteRegistry(Path(location), node)


def open_database(location: str | Path, create: bool = True) -> Any:
    """The database under a registry, schema unchecked: for `p11grid db`."""
    if is_postgres(location):
        from grid_backend.registry.postgres import PostgresDatabase

        return PostgresDatabase(str(location))
    path = Path(location)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteDatabase(path, create=create)
