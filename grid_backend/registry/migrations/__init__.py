"""Versioned schema migrations of the registry, for both backends.

Each migration is a module of this package named `vNNN_name.py` with a function
`upgrade(step: Step) -> None`; its version is NNN. The versions applied are rows of
`schema_migrations (version, name, applied)`. Every migration runs in its own
transaction, together with its row there, so a failed one leaves the database at the
version before it. A SQLite file made before versioned migrations (PRAGMA user_version
1, no schema_migrations) is recognised as version 1.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from grid_backend.registry.core import Database, RegistryError, Transaction, now_text

# Tables of version 1: if they exist without schema_migrations, the database is either a
# pre-migration SQLite registry (recognised) or something we must not touch.
V1_TABLES = {"secure_element", "binding", "element_key", "administrator"}
# Serialises concurrent `p11grid db upgrade` runs on one PostgreSQL database.
ADVISORY_LOCK = 0x7031_3167


@dataclass(frozen=True)
class Step:
    """What a migration sees: the backend's dialect and its transaction."""

    dialect: str
    tx: Transaction

    def run(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.tx.run(sql, parameters)

    def script(self, sql: str) -> None:
        """Statements separated by `;` (none of ours has a `;` inside a literal)."""
        for statement in sql.split(";"):
            if statement.strip():
                self.tx.run(statement)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    upgrade: Callable[[Step], None]


@cache
def available() -> tuple[Migration, ...]:
    found = []
    for module in pkgutil.iter_modules(__path__):
        match = re.fullmatch(r"v(\d{3})_(\w+)", module.name)
        if match:
            loaded = importlib.import_module(f"{__name__}.{module.name}")
            found.append(Migration(int(match[1]), match[2], loaded.upgrade))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"registry migrations are not numbered 1..n: {found}")
    return tuple(found)


def latest() -> int:
    return available()[-1].version


def _tables(tx: Transaction, dialect: str) -> set[str]:
    if dialect == "sqlite":
        rows = tx.run("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = tx.run("SELECT table_name FROM information_schema.tables "
                      "WHERE table_schema = current_schema()")
    return {name for (name,) in rows}


@dataclass(frozen=True)
class State:
    version: int  # 0: nothing of ours yet
    empty: bool  # no table of ours at all (a brand-new SQLite file, an empty database)
    legacy: bool  # a SQLite registry from before schema_migrations (version 1)


def read_state(tx: Transaction, dialect: str, display: str) -> State:
    tables = _tables(tx, dialect)
    if "schema_migrations" in tables:
        (version,) = tx.run("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")[0]
        return State(int(version), False, False)
    ours = tables & V1_TABLES
    if not ours:
        return State(0, True, False)
    if dialect == "sqlite" and ours == V1_TABLES and \
            tx.run("PRAGMA user_version")[0][0] == 1:
        return State(1, False, True)
    raise RegistryError(f"{display} holds registry tables ({', '.join(sorted(ours))}) but no "
                        "schema_migrations table: it was not made by p11grid, so it is left "
                        "alone")


def _state(database: Database) -> State:
    return database.transaction(lambda tx: read_state(tx, database.dialect, database.display),
                                write=False)


def check(database: Database, create_if_empty: bool) -> int:
    """The schema version of an opened database, if this code can use it; else
    RegistryError saying what to do. An empty one is brought to the latest version when
    `create_if_empty` (the embedded SQLite default needs no setup step)."""
    state = _state(database)
    if state.empty and create_if_empty:
        upgrade(database)
        return latest()
    if state.version > latest():
        raise RegistryError(f"the registry {database.display} has schema version "
                            f"{state.version}, newer than this p11grid knows ({latest()}): "
                            "run a p11grid at least as new as the one that upgraded it")
    if state.version < latest():
        raise RegistryError(f"the registry {database.display} has schema version "
                            f"{state.version}; this p11grid needs {latest()}: run "
                            f"`p11grid db upgrade --registry {database.display}` (back it up "
                            "first: docs/registry.md)")
    return state.version


def status(database: Database) -> int:
    return _state(database).version


def upgrade(database: Database, say: Callable[[str], None] = lambda line: None,
            target: int | None = None) -> list[Migration]:
    """Apply the migrations missing (up to `target`, default the latest), one transaction
    each; what was applied. Safe to run twice, and from two processes at once."""
    target = latest() if target is None else target
    applied = []
    for migration in available():
        if migration.version > target:
            break

        def work(tx: Transaction, migration: Migration = migration) -> bool:
            if database.dialect == "postgresql":
                tx.run(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK:d})")
            # Read under the lock: another process may have just applied this one.
            state = read_state(tx, database.dialect, database.display)
            if state.version > latest():
                raise RegistryError(f"the registry {database.display} has schema version "
                                    f"{state.version}, newer than this p11grid knows "
                                    f"({latest()}); nothing done")
            if state.version >= migration.version:
                return False
            tx.run("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                   " name TEXT NOT NULL, applied TEXT NOT NULL)")
            if state.legacy:
                first = available()[0]
                tx.run("INSERT INTO schema_migrations (version, name, applied) "
                       "VALUES (?, ?, ?)", (first.version, first.name, now_text()))
                say(f"recognised schema version 1 ({first.name}): a registry made before "
                    "versioned migrations")
            migration.upgrade(Step(database.dialect, tx))
            tx.run("INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                   (migration.version, migration.name, now_text()))
            if database.dialect == "sqlite":
                # Kept equal to the version: a p11grid from before migrations then refuses
                # the file ("upgrade p11grid") instead of misreading it.
                tx.run(f"PRAGMA user_version = {migration.version:d}")
                broken = tx.run("PRAGMA foreign_key_check")
                if broken:
                    raise RegistryError(f"migration {migration.version} would break foreign "
                                        f"keys: {broken[:3]}")
            return True

        started = time.monotonic()
        if database.migrate(work):
            applied.append(migration)
            say(f"applied migration {migration.version} ({migration.name}) in "
                f"{time.monotonic() - started:.2f} s")
    return applied
