"""The registry of the grid: its secure elements, which identity each is bound to, the keys
generated in them, and who may administer them.

`Registry` is the interface the service and the CLI use; `SqliteRegistry` is the embedded
default. A server database (PostgreSQL, a later issue) implements the same interface.
Identities are SPIFFE URIs (spiffe://<trust-domain>/vm/<name>) or, for callers whose
certificate carries none, the certificate's CN.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS secure_element (
    seid TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    driver TEXT NOT NULL,
    settings TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS binding (
    identity TEXT NOT NULL,
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    created TEXT NOT NULL,
    PRIMARY KEY (identity, seid)
);
CREATE TABLE IF NOT EXISTS element_key (
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    label TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (seid, label)
);
CREATE TABLE IF NOT EXISTS administrator (
    identity TEXT NOT NULL,
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    PRIMARY KEY (identity, seid)
);
"""


class RegistryError(Exception):
    """A registry request that cannot be done; the message says why."""


@dataclass(frozen=True)
class ElementRecord:
    seid: str
    label: str
    driver: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class KeyRecord:
    seid: str
    label: str
    key_id: str  # hex
    kind: str  # rsa2048, rsa3072, ec256, ec384


class Registry(Protocol):
    def add_element(self, record: ElementRecord) -> None: ...
    def update_element(self, record: ElementRecord) -> None: ...
    def elements(self) -> list[ElementRecord]: ...
    def element(self, seid: str) -> ElementRecord: ...
    def bind(self, identity: str, seid: str) -> None: ...
    def unbind(self, identity: str, seid: str) -> None: ...
    def bindings(self) -> list[tuple[str, str]]: ...
    def allowed(self, identities: list[str]) -> set[str]: ...
    def add_key(self, record: KeyRecord) -> None: ...
    def remove_keys(self, seid: str, key_id: str) -> None: ...
    def keys(self, seid: str | None = None) -> list[KeyRecord]: ...
    def add_administrator(self, identity: str, seid: str) -> None: ...
    def administrators(self, seid: str) -> list[str]: ...


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class SqliteRegistry:
    """The registry in one SQLite file; safe for the service's threads and for the CLI
    writing while the service reads (WAL journal)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry {path}: {exc}") from exc
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RegistryError(f"{path} has schema {version}; this p11grid knows "
                                    f"{SCHEMA_VERSION} (upgrade p11grid)")
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                with self._db:
                    return list(self._db.execute(sql, parameters).fetchall())
            except sqlite3.IntegrityError as exc:
                raise RegistryError(str(exc)) from exc

    def add_element(self, record: ElementRecord) -> None:
        if self._run("SELECT 1 FROM secure_element WHERE seid = ?", (record.seid,)):
            raise RegistryError(f"secure element {record.seid!r} is already registered")
        self._run("INSERT INTO secure_element VALUES (?, ?, ?, ?, ?)",
                  (record.seid, record.label, record.driver,
                   json.dumps(record.settings, sort_keys=True), _now()))

    def update_element(self, record: ElementRecord) -> None:
        """Replace a registered element's label, driver and settings; its bindings, keys
        and administrators stay."""
        self.element(record.seid)
        self._run("UPDATE secure_element SET label = ?, driver = ?, settings = ? "
                  "WHERE seid = ?",
                  (record.label, record.driver, json.dumps(record.settings, sort_keys=True),
                   record.seid))

    def elements(self) -> list[ElementRecord]:
        rows = self._run("SELECT seid, label, driver, settings FROM secure_element ORDER BY seid")
        return [ElementRecord(s, label, d, json.loads(settings)) for s, label, d, settings in rows]

    def element(self, seid: str) -> ElementRecord:
        rows = self._run("SELECT seid, label, driver, settings FROM secure_element "
                         "WHERE seid = ?", (seid,))
        if not rows:
            raise RegistryError(f"no secure element {seid!r}")
        s, label, driver, settings = rows[0]
        return ElementRecord(s, label, driver, json.loads(settings))

    def bind(self, identity: str, seid: str) -> None:
        self.element(seid)
        self._run("INSERT OR IGNORE INTO binding VALUES (?, ?, ?)", (identity, seid, _now()))

    def unbind(self, identity: str, seid: str) -> None:
        self._run("DELETE FROM binding WHERE identity = ? AND seid = ?", (identity, seid))

    def bindings(self) -> list[tuple[str, str]]:
        return [(i, s) for i, s in
                self._run("SELECT identity, seid FROM binding ORDER BY identity, seid")]

    def allowed(self, identities: list[str]) -> set[str]:
        if not identities:
            return set()
        marks = ",".join("?" * len(identities))
        rows = self._run(f"SELECT seid FROM binding WHERE identity IN ({marks})",
                         tuple(identities))
        return {seid for (seid,) in rows}

    def add_key(self, record: KeyRecord) -> None:
        self._run("INSERT INTO element_key VALUES (?, ?, ?, ?, ?)",
                  (record.seid, record.label, record.key_id, record.kind, _now()))

    def remove_keys(self, seid: str, key_id: str) -> None:
        """Forget the keys recorded with this id (hex) in the element: a PIV slot's key,
        replaced by a new one."""
        self._run("DELETE FROM element_key WHERE seid = ? AND key_id = ?",
                  (seid, key_id.lower()))

    def keys(self, seid: str | None = None) -> list[KeyRecord]:
        if seid is None:
            rows = self._run("SELECT seid, label, key_id, kind FROM element_key "
                             "ORDER BY seid, label")
        else:
            rows = self._run("SELECT seid, label, key_id, kind FROM element_key WHERE seid = ? "
                             "ORDER BY label", (seid,))
        return [KeyRecord(*row) for row in rows]

    def add_administrator(self, identity: str, seid: str) -> None:
        self.element(seid)
        self._run("INSERT OR IGNORE INTO administrator VALUES (?, ?)", (identity, seid))

    def administrators(self, seid: str) -> list[str]:
        return [i for (i,) in self._run("SELECT identity FROM administrator WHERE seid = ? "
                                        "ORDER BY identity", (seid,))]
