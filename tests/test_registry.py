"""The registry on both backends (SQLite file, real PostgreSQL server): one contract,
versioned migrations (from a SQLite file made by the schema before them), nodes, the
replay cache and revocations shared by two grid nodes, the audit writer, and failures:
wrong password, unreachable, stalled, and dropped database connections."""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg.conninfo
import pytest
from cryptography.hazmat.primitives import serialization

from grid_backend.protocol import IdentityRefused
from grid_backend.registry import (
    AuditRow,
    ElementRecord,
    KeyRecord,
    Registry,
    RegistryError,
    migrations,
    open_database,
    open_registry,
)
from grid_backend.registry.audit import AuditWriter
from grid_backend.registry.postgres import parse_location
from grid_backend.secure_element import ElementFailure
from grid_backend.service.config import GridConfigError, load
from grid_backend.service.server import AuditTrail, Caller, GridService
from idm.chain import TrustAnchor
from idm.identity import Identity, identity_of
from idm.relying_party import AuthorizationRefused, RelyingParty
from p11grid.cli import main
from tests.conftest import PostgresServer
from tests.test_idm_relying_party import ISSUER, Setup, make_world
from tests.test_idm_tokens import DOMAIN, SP

VM1 = f"spiffe://{DOMAIN}/vm/vm-1"

# The registry's SQL before versioned migrations (grid_backend/registry.py, schema 1).
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS secure_element (
    seid TEXT PRIMARY KEY, label TEXT NOT NULL, driver TEXT NOT NULL,
    settings TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS binding (
    identity TEXT NOT NULL,
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    created TEXT NOT NULL, PRIMARY KEY (identity, seid));
CREATE TABLE IF NOT EXISTS element_key (
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    label TEXT NOT NULL, key_id TEXT NOT NULL, kind TEXT NOT NULL, created TEXT NOT NULL,
    PRIMARY KEY (seid, label));
CREATE TABLE IF NOT EXISTS administrator (
    identity TEXT NOT NULL,
    seid TEXT NOT NULL REFERENCES secure_element(seid) ON DELETE CASCADE,
    PRIMARY KEY (identity, seid));
"""
V1_DATA = """
INSERT INTO secure_element VALUES ('se-1', 'Token 1', 'pkcs11', '{"library": "/x.so"}',
                                   '2024-01-02T03:04:05+00:00');
INSERT INTO binding VALUES ('spiffe://p11grid.test/vm/vm-1', 'se-1', '2024-01-03T00:00:00+00:00');
INSERT INTO binding VALUES ('racs-user', 'se-1', '2024-01-04T00:00:00+00:00');
INSERT INTO element_key VALUES ('se-1', 'k-ec', '01', 'ec256', '2024-01-02T03:04:06+00:00');
INSERT INTO administrator VALUES ('operator-1', 'se-1');
"""


def _upgraded(url: str) -> str:
    database = open_database(url)
    try:
        migrations.upgrade(database)
    finally:
        database.close()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a registry at the current schema lives, on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.sqlite")  # created on first open
    return _upgraded(request.getfixturevalue("postgres_url"))


@pytest.fixture()
def registry(location: str) -> Iterator[Registry]:
    opened = open_registry(location)
    yield opened
    opened.close()


# The contract, on both backends ----------------------------------------------------------

def test_elements_keys_bindings_administrators(registry: Registry) -> None:
    record = ElementRecord("se-1", "Token 1", "pkcs11", {"library": "/x.so"})
    registry.add_element(record)
    with pytest.raises(RegistryError, match="'se-1' is already registered"):
        registry.add_element(record)
    assert registry.element("se-1") == record
    with pytest.raises(RegistryError, match="no secure element 'nope'"):
        registry.element("nope")
    with pytest.raises(RegistryError, match="no secure element 'nope'"):
        registry.bind(VM1, "nope")
    registry.update_element(dataclasses.replace(record, settings={"library": "/y.so"}))
    assert registry.element("se-1").settings == {"library": "/y.so"}
    registry.bind(VM1, "se-1")
    registry.bind(VM1, "se-1")  # twice: still one binding
    registry.bind("racs-user", "se-1")
    assert registry.bindings() == [("racs-user", "se-1"), (VM1, "se-1")]
    assert registry.allowed([VM1, "someone"]) == {"se-1"} and registry.allowed([]) == set()
    assert [(i.uri, i.kind) for i in registry.identities()] == [("racs-user", "cn"),
                                                               (VM1, "vm")]
    registry.unbind("racs-user", "se-1")
    assert registry.allowed(["racs-user"]) == set()
    registry.add_key(KeyRecord("se-1", "k-ec", "01", "ec256"))
    registry.add_key(KeyRecord("se-1", "k-rsa", "02", "rsa2048"))
    with pytest.raises(RegistryError, match="already has a key labelled 'k-ec'"):
        registry.add_key(KeyRecord("se-1", "k-ec", "03", "ec256"))
    registry.remove_keys("se-1", "02")
    assert registry.keys() == registry.keys("se-1") == [KeyRecord("se-1", "k-ec", "01", "ec256")]
    registry.add_administrator("operator-1", "se-1")
    assert registry.administrators("se-1") == ["operator-1"]


def test_removing_administrators_and_placements(location: str) -> None:
    one, two = open_registry(location, "n1"), open_registry(location, "n2")
    try:
        one.add_element(ElementRecord("shared", "S", "pkcs11", {"token_label": "a"}, "n1"))
        two.add_element(ElementRecord("shared", "S", "pkcs11", {"token_label": "b"}, "n2"))
        one.bind(VM1, "shared")
        one.add_key(KeyRecord("shared", "k", "31", "ec256"))
        one.add_administrator("operator-1", "shared")
        assert one.remove_administrator("operator-1", "shared") is True
        assert one.remove_administrator("operator-1", "shared") is False
        assert one.administrators("shared") == []
        one.add_administrator("operator-1", "shared")
        # One placement gone: the element, its binding and keys stay for the other node.
        assert one.remove_element("shared") is True
        assert one.remove_element("shared") is False
        assert [(e.seid, e.node) for e in one.placements()] == [("shared", "n2")]
        assert one.allowed([VM1]) == {"shared"} and one.keys("shared")
        # The last placement: the element's records go with it.
        assert two.remove_element("shared") is True
        assert two.placements() == [] and two.bindings() == [] and two.keys() == []
        assert two.administrators("shared") == []
    finally:
        one.close()
        two.close()


def test_nodes_scope_elements_not_bindings(location: str) -> None:
    one, two = open_registry(location, "n1"), open_registry(location, "n2")
    try:
        one.add_element(ElementRecord("shared", "S", "pkcs11", {"token_label": "a"}, "n1"))
        two.add_element(ElementRecord("shared", "S", "pkcs11", {"token_label": "b"}, "n2"))
        one.add_element(ElementRecord("only-1", "O", "pkcs11", {}, "n1"))
        assert [e.seid for e in one.elements()] == ["only-1", "shared"]
        assert [(e.seid, e.node) for e in two.elements()] == [("shared", "n2")]
        assert two.element("shared").settings == {"token_label": "b"}
        with pytest.raises(RegistryError, match=r"not placed on node 'n2' .*'n1'"):
            two.element("only-1")
        assert [(e.seid, e.node) for e in two.placements()] == [
            ("only-1", "n1"), ("shared", "n1"), ("shared", "n2")]
        # Bindings, keys and administrators are per seid: every node sees them.
        one.bind(VM1, "shared")
        one.add_key(KeyRecord("shared", "k", "31", "ec256"))
        assert two.allowed([VM1]) == {"shared"} and [k.label for k in two.keys("shared")] == ["k"]
    finally:
        one.close()
        two.close()


def test_revocations(registry: Registry) -> None:
    serial = 0x1F2E3D4C5B6A79880123456789ABCDEF
    assert not registry.revoked(serial)
    assert registry.revoke(serial, VM1, "key compromise")
    assert not registry.revoke(serial, VM1, "again")  # the first record stays
    assert registry.revoked(serial) and not registry.revoked(serial + 1)
    [record] = registry.revocations()
    assert (record.serial, record.identity, record.reason) == (serial, VM1, "key compromise")


def test_replay_cache_across_two_registry_objects(location: str) -> None:
    one, two = open_registry(location, "n1"), open_registry(location, "n2")
    try:
        later = time.time() + 300
        assert one.first_use("jti-1", later)
        assert not two.first_use("jti-1", later)  # the other node sees it at once
        assert not one.first_use("jti-1", later)
        assert two.first_use("jti-2", later)
        # A jti whose token (plus leeway) has expired is forgotten: not a replay.
        gone = time.time() - 3600
        assert one.first_use("jti-old", gone) and two.first_use("jti-old", gone)
    finally:
        one.close()
        two.close()


def test_audit_rows(registry: Registry) -> None:
    rows = [AuditRow(f"2025-01-01T00:00:0{i}.000+00:00", "n1", VM1, "se-1",
                     "k-ec" if i else None, 0x1041 if i else None, "sign", "ok", 0.25 * i)
            for i in range(3)]
    registry.add_audit(rows)
    recent = registry.audit(limit=2)
    assert [r.at for r in recent] == [rows[2].at, rows[1].at]  # newest first
    assert dataclasses.replace(recent[0], id=0) == rows[2] and recent[0].id > recent[1].id
    assert registry.audit(limit=10)[-1].key is None


# Migrations -------------------------------------------------------------------------------

def test_a_v1_sqlite_file_is_upgraded_without_loss(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.sqlite"
    made = sqlite3.connect(path)
    made.executescript(V1_SCHEMA + V1_DATA)
    made.execute("PRAGMA user_version=1")
    made.commit()
    made.close()
    with pytest.raises(RegistryError, match=f"version 1; this p11grid needs 2: run `p11grid "
                                            f"db upgrade --registry {re.escape(str(path))}`"):
        open_registry(path)
    assert main(["db", "status", "--registry", str(path)]) == 1
    assert "missing: 2 (nodes_identities" in capsys.readouterr().out
    assert main(["db", "upgrade", "--registry", str(path)]) == 0
    out = capsys.readouterr().out
    assert "schema version 1; this p11grid's is 2" in out
    assert "recognised schema version 1" in out and "applied migration 2" in out
    assert main(["db", "upgrade", "--registry", str(path)]) == 0  # twice: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert main(["db", "status", "--registry", str(path)]) == 0
    registry = open_registry(path)
    try:
        assert registry.element("se-1") == ElementRecord("se-1", "Token 1", "pkcs11",
                                                         {"library": "/x.so"}, "")
        assert registry.keys() == [KeyRecord("se-1", "k-ec", "01", "ec256")]
        assert registry.allowed(["spiffe://p11grid.test/vm/vm-1"]) == {"se-1"}
        assert registry.administrators("se-1") == ["operator-1"]
        assert [(i.uri, i.kind, i.enrolled) for i in registry.identities()] == [
            ("racs-user", "cn", "2024-01-04T00:00:00+00:00"),
            ("spiffe://p11grid.test/vm/vm-1", "vm", "2024-01-03T00:00:00+00:00")]
        # A second placement of the same element: possible only after migration 2.
        registry.add_element(ElementRecord("se-1", "Token 1", "pkcs11", {}, "n2"))
    finally:
        registry.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT version, name FROM schema_migrations ORDER BY version"
                         ).fetchall() == [(1, "initial"),
                                          (2, "nodes_identities_revocations_replay_audit")]
    assert check.execute("PRAGMA user_version").fetchone() == (2,)
    check.close()


def test_a_new_sqlite_file_needs_no_step(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "fresh.sqlite"
    path.parent.mkdir()
    open_registry(path).close()  # made at the current version
    database = open_database(path, create=False)
    assert migrations.status(database) == migrations.latest() == 2
    database.close()


def test_a_postgres_registry_behind_or_empty_says_what_to_run(postgres_url: str,
                                                              postgres_server: PostgresServer,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    shown = postgres_url  # nothing secret in it: the password is in a file
    with pytest.raises(RegistryError, match="schema version 0; this p11grid needs 2: run "
                                            "`p11grid db upgrade --registry postgresql://"):
        open_registry(postgres_url)
    database = open_database(postgres_url)
    migrations.upgrade(database, target=1)
    # Version 1 with data, as an upgrade from it would find it.
    database.transaction(lambda tx: [
        tx.run("INSERT INTO secure_element VALUES ('se-1', 'T', 'pkcs11', '{}', 'now')"),
        tx.run("INSERT INTO binding VALUES (?, 'se-1', 'then')", (VM1,))])
    database.close()
    with pytest.raises(RegistryError, match=f"schema version 1; .* --registry {re.escape(shown)}`"):
        open_registry(postgres_url)
    assert main(["db", "status", "--registry", postgres_url]) == 1
    assert main(["db", "upgrade", "--registry", postgres_url]) == 0
    assert "applied migration 2" in capsys.readouterr().out
    assert main(["db", "upgrade", "--registry", postgres_url]) == 0
    assert "nothing to do" in capsys.readouterr().out
    registry = open_registry(postgres_url, "n2")
    try:
        assert registry.allowed([VM1]) == {"se-1"}
        assert [(e.seid, e.node) for e in registry.placements()] == [("se-1", "")]
        assert [i.kind for i in registry.identities()] == ["vm"]
        registry.add_element(ElementRecord("se-1", "T", "pkcs11", {}, "n2"))
        # The old foreign keys went with the old primary key; bind still checks the seid.
        with pytest.raises(RegistryError, match="no secure element"):
            registry.bind(VM1, "ghost")
    finally:
        registry.close()


def test_a_newer_schema_is_refused(location: str) -> None:
    open_registry(location).close()
    database = open_database(location)
    database.transaction(lambda tx: tx.run(
        "INSERT INTO schema_migrations (version, name, applied) VALUES (99, 'future', 'x')"))
    database.close()
    with pytest.raises(RegistryError, match="schema version 99, newer than this p11grid"):
        open_registry(location)
    database = open_database(location)
    with pytest.raises(RegistryError, match="newer than this p11grid"):
        migrations.upgrade(database)
    database.close()


# Grid nodes sharing PostgreSQL: replay and revocation through the service ---------------

@dataclasses.dataclass
class Identities:
    setup: Setup  # tokens made as the OpenID provider and the hypervisor make them
    ca_dir: Path

    def service(self, location: str, node: str) -> GridService:
        party = RelyingParty(lambda: TrustAnchor.load(self.ca_dir / "ca.pem",
                                                      self.ca_dir / "crl.pem"),
                             Identity.parse(SP), ISSUER, self.setup.jwks)
        return GridService(open_registry(location, node), relying_party=party)

    def authorize(self, service: GridService, access: str, vm: str = "vm-1") -> None:
        world = self.setup.world
        entity = world.vm if vm == "vm-1" else world.other_vm
        service.op_authorize(Caller([identity_of(entity.certificate).uri], entity.certificate),
                             {"seid": "se-1", "access_token": access,
                              "vm_token": self.setup.vm_token(vm=entity)})


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    root = tmp_path_factory.mktemp("registry-ca")
    world, idp_key, jwks = make_world(root)
    return Identities(Setup(world, idp_key, jwks, None, set()),  # type: ignore[arg-type]
                      root / "ca")


@pytest.fixture()
def two_nodes(postgres_url: str, identities: Identities
              ) -> Iterator[tuple[GridService, GridService]]:
    _upgraded(postgres_url)
    first, second = identities.service(postgres_url, "n1"), identities.service(postgres_url,
                                                                                "n2")
    first.registry.add_element(ElementRecord("se-1", "S", "pkcs11", {}, "n1"))
    second.registry.add_element(ElementRecord("se-1", "S", "pkcs11", {}, "n2"))
    for vm in ("vm-1", "vm-2"):
        first.registry.bind(f"spiffe://{DOMAIN}/vm/{vm}", "se-1")
    yield first, second
    first.registry.close()
    second.registry.close()


def test_a_token_replayed_on_the_other_node_is_refused(
        two_nodes: tuple[GridService, GridService], identities: Identities) -> None:
    first, second = two_nodes
    world = identities.setup.world
    access = identities.setup.access(world.vm, [world.hv])
    identities.authorize(first, access)
    with pytest.raises(IdentityRefused, match="presented before"):
        identities.authorize(second, access)
    identities.authorize(second, identities.setup.access(world.vm, [world.hv]))  # fresh: ok


def test_a_revoked_certificate_is_refused_at_once_on_every_node(
        two_nodes: tuple[GridService, GridService], identities: Identities) -> None:
    first, second = two_nodes
    setup, world = identities.setup, identities.setup.world
    identities.authorize(second, setup.access(world.vm, [world.hv]))
    first.registry.revoke(world.vm.certificate.serial_number, VM1, "key compromise")
    with pytest.raises(IdentityRefused,
                       match=r"revocation: the caller's certificate \(serial [0-9a-f]+, "
                             rf"{VM1}\) is revoked"):
        identities.authorize(second, setup.access(world.vm, [world.hv]))
    # The hypervisor's certificate, which signs VM tokens: vm-2's are refused too.
    identities.authorize(second, setup.access(world.other_vm, [world.hv]), vm="vm-2")
    first.registry.revoke(world.hv.certificate.serial_number, "hv-1", "retired")
    with pytest.raises(IdentityRefused, match="revocation: the vm token's signer certificate"):
        identities.authorize(second, setup.access(world.other_vm, [world.hv]), vm="vm-2")


def test_revocation_and_replay_checks_fail_closed(identities: Identities,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A store that cannot answer refuses the authorization (idm-only, no database); why
    is logged, not told to the caller."""
    setup, world = identities.setup, identities.setup.world

    def down(*_: object) -> bool:
        raise OSError("the store is down")

    party = RelyingParty(lambda: TrustAnchor.load(identities.ca_dir / "ca.pem",
                                                  identities.ca_dir / "crl.pem"),
                         Identity.parse(SP), ISSUER, setup.jwks, revoked=down)
    arguments = (world.vm.certificate, setup.access(world.vm, [world.hv]), setup.vm_token(),
                 lambda subject: True)
    with pytest.raises(AuthorizationRefused, match="revocation: cannot check the caller's"
                       ) as refused:
        party.authorize(*arguments)
    assert "the store is down" not in str(refused.value)
    assert "the store is down" in caplog.text
    party.revoked = lambda serial: False
    party.replay = dataclasses.make_dataclass("Down", [], namespace={"first_use": down})()
    with pytest.raises(AuthorizationRefused, match="cannot check whether jti"):
        party.authorize(*arguments)


# The audit writer ------------------------------------------------------------------------

def test_audit_rows_reach_the_registry_in_batches(location: str, tmp_path: Path) -> None:
    """Through the service's AuditTrail: each line in the audit file, and as a row."""
    writer = AuditWriter(lambda: open_registry(location, "n1"), "n1", location,
                         batch=100, interval=0.2)
    trail = AuditTrail(tmp_path / "audit.log", writer)
    for n in range(250):
        trail.record(VM1, "sign", "se-1", "ok", 0.5, key="k-ec", mechanism=0x1041 + n % 2)
    deadline = time.monotonic() + 10
    while writer.written < 250 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.written == 250 and writer.dropped == 0
    trail.record("racs-user", "authorize", "se-1", "identity", 1.0)
    trail.close()  # the last row is written at close
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 251
    registry = open_registry(location)
    try:
        rows = registry.audit(limit=1000)
    finally:
        registry.close()
    assert len(rows) == 251
    assert (rows[0].who, rows[0].operation, rows[0].result, rows[0].key) == \
        ("racs-user", "authorize", "identity", None)
    assert {r.node for r in rows} == {"n1"} and {r.mechanism for r in rows[1:]} == {
        0x1041, 0x1042}


def test_audit_rows_are_dropped_and_counted_when_the_database_is_down(
        postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    closed = _closed_port()
    url = f"postgresql://{postgres_server.user}@127.0.0.1:{closed}/nothing" \
          f"?password_file={postgres_server.password_file}"
    writer = AuditWriter(lambda: open_registry(url), "n1", url, batch=100, interval=0.2,
                         capacity=1000)
    caplog.set_level(logging.WARNING, logger="p11grid.grid")
    started = time.perf_counter()
    for _ in range(5000):
        writer.add(VM1, "sign", "se-1", "ok", 0.05, key="k", mechanism=0x1041)
    took = time.perf_counter() - started
    assert took < 1.0, f"5000 audit rows took {took:.3f} s with the database down"
    deadline = time.monotonic() + 10
    while writer.dropped < 5000 and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.close(timeout=5)
    assert writer.dropped == 5000 and writer.written == 0
    warnings = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert warnings and "5000 since start" in warnings[-1]
    assert "cannot connect to the registry" in " ".join(warnings)


# Connection faults -------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_wrong_or_missing_password_is_a_clear_error(postgres_url: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("Not-The-Password-4711\n")
    url = postgres_url.split("?")[0]
    with pytest.raises(RegistryError) as refused:
        open_registry(f"{url}?password_file={wrong}")
    message = str(refused.value)
    assert "password authentication failed" in message and "cannot connect" in message
    assert "Not-The-Password-4711" not in message
    # A password written in the URL itself is never shown either.
    with pytest.raises(RegistryError) as refused:
        open_registry(url.replace("p11grid_test@", "p11grid_test:Not-The-Password-4711@"))
    assert "Not-The-Password-4711" not in str(refused.value)
    assert "p11grid_test@127.0.0.1" in str(refused.value)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(RegistryError, match=r"no password supplied.*password_file=PATH"):
        open_registry(url)
    with pytest.raises(RegistryError, match="cannot read its password_file"):
        open_registry(f"{url}?password_file={tmp_path / 'absent'}")


def test_libpq_parameters_reach_it_as_written() -> None:
    """Not re-encoded (libpq reads %20 as a space and + as a plus), and not replaced by
    our defaults; our own parameters and any password stay out of what is shown."""
    target = parse_location("postgresql://grid:s%3Acret@db/p11grid?options=-c%20search_path"
                            "%3Dgrid&application_name=node+1&statement_timeout=900"
                            "&sslmode=require&pass%77ord=other")
    assert "statement_timeout" not in target.conninfo
    given = psycopg.conninfo.conninfo_to_dict(target.conninfo)
    assert (given["application_name"], given["sslmode"]) == ("node+1", "require")
    assert "application_name" not in target.options
    assert target.options["options"] == "-c search_path=grid -c statement_timeout=900"
    assert target.display == "postgresql://grid@db/p11grid?options=-c%20search_path%3Dgrid" \
        "&application_name=node+1&statement_timeout=900&sslmode=require"
    assert target.secret == "s:cret"
    assert parse_location("postgresql://grid@db/x?password=a+b").secret == "a+b"
    assert parse_location("postgresql://grid@db/x").options["application_name"] == "p11grid"


def test_an_unreachable_database_fails_fast(postgres_server: PostgresServer) -> None:
    url = f"postgresql://{postgres_server.user}@127.0.0.1:{_closed_port()}/x" \
          f"?password_file={postgres_server.password_file}"
    started = time.monotonic()
    with pytest.raises(RegistryError, match="cannot connect to the registry"):
        open_registry(url)
    assert time.monotonic() - started < 6


class _Relay:
    """A TCP relay to the server whose traffic the test can freeze: a network that
    stalls (the server is fine, its answers never arrive)."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            far.settimeout(None)
            self._sockets += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.01)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def close(self) -> None:
        """Cut every connection and stop listening. shutdown() first: close() alone does
        not end a socket another thread is blocked on."""
        self.frozen.clear()
        for end in [self._listener, *self._sockets]:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()


def test_a_stalled_database_gives_an_error_within_the_deadline(
        postgres_url: str, postgres_server: PostgresServer) -> None:
    _upgraded(postgres_url)
    relay = _Relay(postgres_server.port)
    url = postgres_url.replace(f":{postgres_server.port}/", f":{relay.port}/") \
        + "&statement_timeout=500&connect_timeout=4"
    registry = open_registry(url)
    try:
        assert registry.allowed([VM1]) == set()
        relay.frozen.set()
        started = time.monotonic()
        with pytest.raises(RegistryError, match=r"did not answer within 2.5 s"):
            registry.allowed([VM1])
        assert time.monotonic() - started < 4.5  # statement_timeout + 2 s grace, not forever
        # A thread reconnecting (4 s to connect_timeout) holds the shared connection; one
        # queued behind it gives up after the 2.5 s deadline, not when that one ends.
        reconnecting: list[BaseException] = []

        def reconnect() -> None:
            try:
                registry.allowed([VM1])
            except RegistryError as exc:
                reconnecting.append(exc)

        holder = threading.Thread(target=reconnect)
        holder.start()
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(RegistryError, match=r"is busy: another request has held its "
                                                r"connection for over 2.5 s"):
            registry.allowed([VM1])
        assert time.monotonic() - started < 3.2
        holder.join(10)
        assert "cannot connect to the registry" in str(reconnecting)
        relay.frozen.clear()
        assert registry.allowed([VM1]) == set()  # a new connection, by itself
    finally:
        registry.close()
        relay.close()


def test_a_registry_gone_mid_service_is_a_clean_failure(postgres_url: str,
                                                        postgres_server: PostgresServer) -> None:
    _upgraded(postgres_url)
    relay = _Relay(postgres_server.port)
    url = postgres_url.replace(f":{postgres_server.port}/", f":{relay.port}/")
    service = GridService(open_registry(url))
    try:
        assert service.handle(Caller([VM1]), "list", {}) == {"elements": []}
        relay.close()  # its connections cut, its port closed: no reconnecting either
        started = time.monotonic()
        with pytest.raises(ElementFailure, match="the grid's registry is unavailable") as failed:
            service.handle(Caller([VM1]), "list", {})
        assert "127.0.0.1" not in str(failed.value)  # where it lives is for the log only
        assert time.monotonic() - started < 6
    finally:
        service.registry.close()


def test_a_dropped_connection_is_reopened(postgres_url: str,
                                          postgres_server: PostgresServer) -> None:
    _upgraded(postgres_url)
    registry = open_registry(postgres_url)
    try:
        registry.revoke(7, VM1, "test")
        name = urlsplit(postgres_url).path.lstrip("/")
        # Its one connection, ended by the server (waiting until it is gone, up to 5 s).
        assert postgres_server.admin(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()") == [(True,)]
        assert registry.revoked(7)  # the next request reconnects and answers
    finally:
        registry.close()


# Configuration and CLI ----------------------------------------------------------------------

def test_grid_config_takes_a_url_and_a_node(tmp_path: Path) -> None:
    config = tmp_path / "grid.toml"
    base = ('[grid]\ncertificate = "/c.pem"\nkey = "/c.key"\nclient_ca = "/ca.pem"\n')
    config.write_text(base + 'registry = "postgresql://grid@db/p11grid?password_file=/p"\n'
                             'node = "n1"\n')
    loaded = load(config)
    assert loaded.registry == "postgresql://grid@db/p11grid?password_file=/p"
    assert loaded.node == "n1"
    config.write_text(base + 'registry = "/var/lib/p11grid/registry.sqlite"\n')
    assert load(config).registry == Path("/var/lib/p11grid/registry.sqlite")
    assert load(config).node == ""
    # Audit rows in the registry: shared by the nodes of a PostgreSQL registry by default,
    # off by default for the embedded SQLite one (its audit file is the record).
    assert load(config).audit_to_registry is False
    config.write_text(base + 'registry = "postgresql://grid@db/p11grid"\n')
    assert load(config).audit_to_registry is True
    config.write_text(base + 'registry = "postgresql://grid@db/p11grid"\n'
                             'audit_to_registry = false\n')
    assert load(config).audit_to_registry is False
    config.write_text(base + 'registry = "/r.sqlite"\naudit_to_registry = "yes"\n')
    with pytest.raises(GridConfigError, match="audit_to_registry must be true or false"):
        load(config)
    # `p11grid db` finds the registry in the service's config.
    config.write_text(base + f'registry = "{tmp_path / "grid.sqlite"}"\n')
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert main(["db", "status", "--config", str(config)]) == 0
    assert (tmp_path / "grid.sqlite").exists()


def test_grid_cli_nodes_revocations_audit(postgres_url: str, identities: Identities,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _upgraded(postgres_url)
    registry = ["--registry", postgres_url]
    for node in ("n1", "n2"):
        assert main(["grid", "add-se", *registry, "--node", node, "--seid", "se-1",
                     "--driver", "pkcs11", "--library", "/x.so", "--token-label", node]) == 0
    assert main(["grid", "bind", *registry, "--identity", VM1, "--seid", "se-1"]) == 0
    capsys.readouterr()
    assert main(["grid", "list", *registry]) == 0
    listed = capsys.readouterr().out
    assert "se-1\tpkcs11\tlabel=se-1\tnode=n1" in listed
    assert "se-1\tpkcs11\tlabel=se-1\tnode=n2" in listed
    assert listed.count(f"bound to {VM1}") == 1
    certificate = tmp_path / "vm.pem"
    vm = identities.setup.world.vm.certificate
    certificate.write_bytes(vm.public_bytes(serialization.Encoding.PEM))
    assert main(["grid", "revoke", *registry, "--certificate", str(certificate),
                 "--reason", "key compromise"]) == 0
    assert f"revoked certificate {vm.serial_number:x} of {VM1}" in capsys.readouterr().out
    assert main(["grid", "revocations", *registry]) == 0
    assert f"{vm.serial_number:x}\t{VM1}\tkey compromise" in capsys.readouterr().out
    assert main(["grid", "identities", *registry]) == 0
    assert f"{VM1}\tvm\tenrolled" in capsys.readouterr().out
    opened = open_registry(postgres_url, "n2")
    opened.add_audit([AuditRow("2025-01-01T00:00:00.000+00:00", "n2", VM1, "se-1", "k-ec",
                               0x1041, "sign", "ok", 0.125)])
    opened.close()
    assert main(["grid", "audit", *registry, "--limit", "5"]) == 0
    assert f"node=n2\t{VM1}\tsign\tseid=se-1\tkey=k-ec\tmechanism=0x1041\tok\t0.125 ms" in \
        capsys.readouterr().out


def test_remove_se_and_admin_remove_at_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = ["--registry", str(tmp_path / "r.sqlite")]
    assert main(["grid", "add-se", *registry, "--seid", "se-9", "--driver", "pkcs11",
                 "--library", "/x.so", "--token-label", "t"]) == 0
    assert main(["grid", "admin", *registry, "--identity", "op", "--seid", "se-9"]) == 0
    assert main(["grid", "admin", *registry, "--identity", "op", "--seid", "se-9",
                 "--remove"]) == 0
    assert main(["grid", "admin", *registry, "--identity", "op", "--seid", "se-9",
                 "--remove"]) == 1
    assert "op does not administer se-9" in capsys.readouterr().err
    assert main(["grid", "remove-se", *registry, "--seid", "se-9"]) == 0
    assert "the keys themselves stay inside the element" in capsys.readouterr().out
    assert main(["grid", "remove-se", *registry, "--seid", "se-9"]) == 1
    assert "no secure element 'se-9'" in capsys.readouterr().err
