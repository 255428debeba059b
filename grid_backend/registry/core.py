"""What both registry backends share: the records, the `Registry` interface, and the SQL
of every request, run through a `Database` (SQLite or PostgreSQL) that only knows how to
run a unit of work in a transaction."""

from __future__ import annotations

import datetime as dt
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# A token is accepted up to this long past its exp (idm.tokens.LEEWAY), so its jti is
# remembered that much longer. Not imported: the registry stays free of idm's JOSE code.
REPLAY_LEEWAY_SECONDS = 60.0
REPLAY_PURGE_SECONDS = 60.0  # expired jtis are deleted at most this often (per process)


class RegistryError(Exception):
    """A registry request that cannot be done; the message says why (never a password)."""


class ElementNotRegistered(RegistryError):
    """No placement of this seid on this registry's node: the element is unknown here,
    not the database failing."""


@dataclass(frozen=True)
class ElementRecord:
    seid: str
    label: str
    driver: str
    settings: dict[str, Any]
    node: str = ""  # the grid node hosting this placement of the element


@dataclass(frozen=True)
class KeyRecord:
    seid: str
    label: str
    key_id: str  # hex
    kind: str  # rsa2048, rsa3072, ec256, ec384


@dataclass(frozen=True)
class IdentityRecord:
    uri: str  # spiffe://<domain>/<kind>/<name>, or a certificate CN
    kind: str  # vm, app, hv, ... from the spiffe path; "cn" for a bare CN
    enrolled: str  # ISO 8601, UTC


@dataclass(frozen=True)
class RevocationRecord:
    serial: int
    identity: str
    reason: str
    revoked: str  # ISO 8601, UTC


@dataclass(frozen=True)
class AuditRow:
    at: str  # ISO 8601, UTC, milliseconds
    node: str
    who: str
    seid: str
    key: str | None
    mechanism: int | None
    operation: str
    result: str
    duration_ms: float
    id: int = 0  # given by the database


class Registry(Protocol):
    location: str  # what open_registry was given (a URL may hold a password: never print)
    display: str  # the location without any password, for messages
    node: str

    def close(self) -> None: ...
    def add_element(self, record: ElementRecord) -> None: ...
    def update_element(self, record: ElementRecord) -> None: ...
    def elements(self) -> list[ElementRecord]: ...
    def placements(self) -> list[ElementRecord]: ...
    def element(self, seid: str) -> ElementRecord: ...
    def bind(self, identity: str, seid: str) -> None: ...
    def unbind(self, identity: str, seid: str) -> None: ...
    def bindings(self) -> list[tuple[str, str]]: ...
    def allowed(self, identities: list[str]) -> set[str]: ...
    def identities(self) -> list[IdentityRecord]: ...
    def add_key(self, record: KeyRecord) -> None: ...
    def remove_keys(self, seid: str, key_id: str) -> None: ...
    def keys(self, seid: str | None = None) -> list[KeyRecord]: ...
    def add_administrator(self, identity: str, seid: str) -> None: ...
    def remove_administrator(self, identity: str, seid: str) -> bool: ...
    def administrators(self, seid: str) -> list[str]: ...
    def remove_element(self, seid: str) -> bool: ...
    def revoke(self, serial: int, identity: str, reason: str) -> bool: ...
    def revoked(self, serial: int) -> bool: ...
    def revocations(self) -> list[RevocationRecord]: ...
    def first_use(self, jti: str, expires: float) -> bool: ...
    def add_audit(self, rows: Sequence[AuditRow]) -> None: ...
    def audit(self, limit: int = 50) -> list[AuditRow]: ...


class Transaction(Protocol):
    """SQL with `?` placeholders, whichever the backend."""

    def run(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def count(self, sql: str, parameters: Sequence[Any] = ()) -> int: ...
    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Database(ABC):
    """One backend's connection. `transaction` runs `work` atomically (write=True) or as
    plain reads, serialised with the other threads of this process; a RegistryError
    raised by `work` rolls back and passes through, a database failure becomes one."""

    dialect: str  # "sqlite" or "postgresql"
    display: str  # the location, safe to print

    @abstractmethod
    def transaction(self, work: Callable[[Transaction], T], write: bool = True) -> T: ...

    @abstractmethod
    def migrate(self, work: Callable[[Transaction], T]) -> T:
        """Like transaction(write=True), with what a schema change needs around it."""

    @abstractmethod
    def close(self) -> None: ...


def now_text() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def identity_kind(uri: str) -> str:
    """spiffe://domain/vm/name -> "vm"; anything else is a certificate CN."""
    if uri.startswith("spiffe://"):
        path = uri[len("spiffe://"):].split("/")
        if len(path) >= 3 and path[1]:
            return path[1]
    return "cn"


class SqlRegistry:
    """The registry's requests in SQL both SQLite and PostgreSQL accept. Elements are
    placements keyed by (seid, node): this object sees its own node's; bindings, keys,
    administrators, identities and revocations are per seid or global, for every node."""

    def __init__(self, database: Database, location: str, node: str = "",
                 create_if_empty: bool = False) -> None:
        """Takes over `database`, closing it if its schema is not one this code can use
        (migrations.check says which command to run)."""
        from grid_backend.registry import migrations  # which imports this module

        try:
            migrations.check(database, create_if_empty)
        except RegistryError:
            database.close()
            raise
        self._db = database
        self.location = location
        self.node = node
        self._purged = 0.0

    @property
    def display(self) -> str:
        return self._db.display

    def close(self) -> None:
        self._db.close()

    def _read(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.transaction(lambda tx: tx.run(sql, parameters), write=False)

    # Elements -----------------------------------------------------------------------------------

    _ELEMENT = "SELECT seid, label, driver, settings, node FROM secure_element"

    @staticmethod
    def _record(row: tuple[Any, ...]) -> ElementRecord:
        seid, label, driver, settings, node = row
        return ElementRecord(seid, label, driver, json.loads(settings), node)

    def add_element(self, record: ElementRecord) -> None:
        # One statement: two nodes adding the same placement at once cannot both pass a
        # check made before the insert (PostgreSQL's transactions do not serialise them).
        if not self._db.transaction(lambda tx: tx.count(
                "INSERT INTO secure_element (seid, label, driver, settings, created, node) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (seid, node) DO NOTHING",
                (record.seid, record.label, record.driver,
                 json.dumps(record.settings, sort_keys=True), now_text(), record.node))):
            raise RegistryError(f"secure element {record.seid!r} is already registered"
                                + (f" on node {record.node!r}" if record.node else ""))

    def update_element(self, record: ElementRecord) -> None:
        """Replace a placement's label, driver and settings; bindings, keys and
        administrators stay."""
        changed = self._db.transaction(lambda tx: tx.count(
            "UPDATE secure_element SET label = ?, driver = ?, settings = ? "
            "WHERE seid = ? AND node = ?",
            (record.label, record.driver, json.dumps(record.settings, sort_keys=True),
             record.seid, record.node)))
        if not changed:
            raise RegistryError(f"no secure element {record.seid!r}"
                                + (f" on node {record.node!r}" if record.node else ""))

    def elements(self) -> list[ElementRecord]:
        rows = self._read(f"{self._ELEMENT} WHERE node = ? ORDER BY seid", (self.node,))
        return [self._record(row) for row in rows]

    def placements(self) -> list[ElementRecord]:
        """Every node's placements."""
        return [self._record(row) for row in self._read(f"{self._ELEMENT} ORDER BY seid, node")]

    def element(self, seid: str) -> ElementRecord:
        rows = self._read(f"{self._ELEMENT} WHERE seid = ? AND node = ?", (seid, self.node))
        if rows:
            return self._record(rows[0])
        elsewhere = [node for (node,) in self._read(
            "SELECT node FROM secure_element WHERE seid = ? ORDER BY node", (seid,))]
        if elsewhere:
            nodes = ", ".join(repr(node) for node in elsewhere)
            raise ElementNotRegistered(f"secure element {seid!r} is not placed on node "
                                       f"{self.node!r} (it is on {nodes})")
        raise ElementNotRegistered(f"no secure element {seid!r}")

    @staticmethod
    def _require(tx: Transaction, seid: str) -> None:
        if not tx.run("SELECT 1 FROM secure_element WHERE seid = ?", (seid,)):
            raise RegistryError(f"no secure element {seid!r}")

    # Bindings and identities --------------------------------------------------------------------

    def bind(self, identity: str, seid: str) -> None:
        def work(tx: Transaction) -> None:
            self._require(tx, seid)
            now = now_text()
            tx.run("INSERT INTO identity (uri, kind, enrolled) VALUES (?, ?, ?) "
                   "ON CONFLICT (uri) DO NOTHING", (identity, identity_kind(identity), now))
            tx.run("INSERT INTO binding (identity, seid, created) VALUES (?, ?, ?) "
                   "ON CONFLICT (identity, seid) DO NOTHING", (identity, seid, now))

        self._db.transaction(work)

    def unbind(self, identity: str, seid: str) -> None:
        self._db.transaction(lambda tx: tx.run(
            "DELETE FROM binding WHERE identity = ? AND seid = ?", (identity, seid)))

    def bindings(self) -> list[tuple[str, str]]:
        return [(i, s) for i, s in
                self._read("SELECT identity, seid FROM binding ORDER BY identity, seid")]

    def allowed(self, identities: list[str]) -> set[str]:
        if not identities:
            return set()
        marks = ", ".join("?" * len(identities))
        rows = self._read(f"SELECT DISTINCT seid FROM binding WHERE identity IN ({marks})",
                          tuple(identities))
        return {seid for (seid,) in rows}

    def identities(self) -> list[IdentityRecord]:
        return [IdentityRecord(*row) for row in
                self._read("SELECT uri, kind, enrolled FROM identity ORDER BY uri")]

    # Keys and administrators --------------------------------------------------------------------

    def add_key(self, record: KeyRecord) -> None:
        if not self._db.transaction(lambda tx: tx.count(
                "INSERT INTO element_key (seid, label, key_id, kind, created) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (seid, label) DO NOTHING",
                (record.seid, record.label, record.key_id, record.kind, now_text()))):
            raise RegistryError(f"{record.seid} already has a key labelled {record.label!r}")

    def remove_keys(self, seid: str, key_id: str) -> None:
        """Forget the keys recorded with this id (hex) in the element: a PIV slot's key,
        replaced by a new one."""
        self._db.transaction(lambda tx: tx.run(
            "DELETE FROM element_key WHERE seid = ? AND key_id = ?", (seid, key_id.lower())))

    def keys(self, seid: str | None = None) -> list[KeyRecord]:
        if seid is None:
            rows = self._read("SELECT seid, label, key_id, kind FROM element_key "
                              "ORDER BY seid, label")
        else:
            rows = self._read("SELECT seid, label, key_id, kind FROM element_key "
                              "WHERE seid = ? ORDER BY label", (seid,))
        return [KeyRecord(*row) for row in rows]

    def add_administrator(self, identity: str, seid: str) -> None:
        def work(tx: Transaction) -> None:
            self._require(tx, seid)
            tx.run("INSERT INTO administrator (identity, seid) VALUES (?, ?) "
                   "ON CONFLICT (identity, seid) DO NOTHING", (identity, seid))

        self._db.transaction(work)

    def remove_administrator(self, identity: str, seid: str) -> bool:
        return bool(self._db.transaction(lambda tx: tx.count(
            "DELETE FROM administrator WHERE identity = ? AND seid = ?", (identity, seid))))

    def administrators(self, seid: str) -> list[str]:
        return [i for (i,) in self._read("SELECT identity FROM administrator WHERE seid = ? "
                                         "ORDER BY identity", (seid,))]

    def remove_element(self, seid: str) -> bool:
        """Forget this node's placement of `seid`; with its last placement, the element's
        bindings, key records and administrators go too. The keys themselves stay inside
        the element. False if this node had no such placement."""
        def work(tx: Transaction) -> bool:
            if not tx.count("DELETE FROM secure_element WHERE seid = ? AND node = ?",
                            (seid, self.node)):
                return False
            if not tx.run("SELECT 1 FROM secure_element WHERE seid = ?", (seid,)):
                for table in ("binding", "element_key", "administrator"):
                    tx.run(f"DELETE FROM {table} WHERE seid = ?", (seid,))
            return True

        return bool(self._db.transaction(work))

    # Revocations --------------------------------------------------------------------------------

    def revoke(self, serial: int, identity: str, reason: str) -> bool:
        """Record a certificate as revoked; False if it already was (the first record
        stays)."""
        return self._db.transaction(lambda tx: tx.count(
            "INSERT INTO revocation (serial, identity, reason, revoked) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (serial) DO NOTHING",
            (f"{serial:x}", identity, reason, now_text()))) == 1

    def revoked(self, serial: int) -> bool:
        return bool(self._read("SELECT 1 FROM revocation WHERE serial = ?", (f"{serial:x}",)))

    def revocations(self) -> list[RevocationRecord]:
        rows = self._read("SELECT serial, identity, reason, revoked FROM revocation "
                          "ORDER BY revoked, serial")
        return [RevocationRecord(int(serial, 16), identity, reason, revoked)
                for serial, identity, reason, revoked in rows]

    # The jti replay cache -----------------------------------------------------------------------

    def first_use(self, jti: str, expires: float) -> bool:
        """True the first time `jti` is seen (until `expires` plus leeway), by any node
        sharing this database. One statement decides, so two nodes racing with the same
        jti cannot both win: the row count says whether this call inserted it (or took
        over an expired row nobody purged yet)."""
        now = time.time()
        purge = now - self._purged > REPLAY_PURGE_SECONDS

        def work(tx: Transaction) -> bool:
            inserted = tx.count(
                "INSERT INTO replay (jti, expires) VALUES (?, ?) ON CONFLICT (jti) "
                "DO UPDATE SET expires = excluded.expires WHERE replay.expires < ?",
                (jti, expires + REPLAY_LEEWAY_SECONDS, now))
            if purge:
                tx.count("DELETE FROM replay WHERE expires < ?", (now,))
            return inserted == 1

        first = self._db.transaction(work)
        if purge:
            self._purged = now
        return first

    # Audit --------------------------------------------------------------------------------------

    _AUDIT_COLUMNS = "at, node, who, seid, key, mechanism, operation, result, duration_ms"

    def add_audit(self, rows: Sequence[AuditRow]) -> None:
        if not rows:
            return
        values = [(r.at, r.node, r.who, r.seid, r.key, r.mechanism, r.operation, r.result,
                   r.duration_ms) for r in rows]
        self._db.transaction(lambda tx: tx.many(
            f"INSERT INTO audit ({self._AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values))

    def audit(self, limit: int = 50) -> list[AuditRow]:
        """The most recent rows, newest first."""
        rows = self._read(f"SELECT {self._AUDIT_COLUMNS}, id FROM audit ORDER BY id DESC "
                          "LIMIT ?", (max(0, int(limit)),))
        return [AuditRow(*row) for row in rows]
