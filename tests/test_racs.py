"""RACS over real TLS on 127.0.0.1: hand-written request scripts and the replies they must
get, every error class, locking, idle timeout, CN authorization, APDU filters, the APDU
transport, the CLI, openssl s_client by hand, and junk fed to the engine and the server."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grid_backend.apdu import CardAbsent, TransportFailure
from grid_backend.racs import cli
from grid_backend.racs.authorization import TableAuthorizer
from grid_backend.racs.client import RacsClient
from grid_backend.racs.elements import ElementHub
from grid_backend.racs.protocol import MAX_LINE, Reply
from grid_backend.racs.server import RacsServerConfig, load_config
from grid_backend.racs.session import RacsSession
from grid_backend.transports.racs import RacsTransport
from tests.racs_cards import LONG_DATA, OTHER_AID, TEST_AID, TEST_ATR, TestCard
from tests.racs_helpers import (
    Pki,
    ServerThread,
    client_for,
    converse,
    make_pki,
    session_closed,
    tls_refused,
)

ATR = TEST_ATR.hex().upper()
SELECT = f"00A404000A{TEST_AID.hex().upper()}"
SELECT_OTHER = f"00A404000A{OTHER_AID.hex().upper()}"
USERS = {"alice": ["SE1", "SE2", "SE3"], "bob": ["SE2"], "admin": "all"}
RULES = [
    {"cn": "alice", "seid": "SE1", "deny": [{"mask": "FFFF0000", "value": "00200000"}]},
    {"cn": "bob", "seid": "SE2", "aids": [TEST_AID.hex()]},
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("racs-pki"), ["alice", "bob", "admin", "mallory"])


def make_config(pki: Pki, cards: dict[str, TestCard], idle_timeout: float = 30.0
                ) -> RacsServerConfig:
    return RacsServerConfig(
        cert=pki.server.cert, key=pki.server.key, ca=pki.ca, elements=dict(cards),
        authorizer=TableAuthorizer.from_mapping(USERS, RULES), host="127.0.0.1", port=0,
        idle_timeout=idle_timeout, card_deadline=1.0)


@pytest.fixture
def cards() -> dict[str, TestCard]:
    return {"SE1": TestCard(), "SE2": TestCard(), "SE3": TestCard(warm_reset=False)}


@pytest.fixture
def racs(pki: Pki, cards: dict[str, TestCard]) -> Iterator[ServerThread]:
    server = ServerThread(make_config(pki, cards)).start()
    yield server
    for card in cards.values():
        card.release.set()  # free any stuck-card thread
    server.stop()


@pytest.fixture
def connect(racs: ServerThread, pki: Pki) -> Iterator[Callable[[str], RacsClient]]:
    opened: list[RacsClient] = []

    def open_as(cn: str) -> RacsClient:
        opened.append(client_for(racs, pki, cn))
        return opened[-1]

    yield open_as
    for client in opened:
        client.close()


def script(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines()) + "\n"


def check(client: RacsClient, request: str, expected: str) -> None:
    assert converse(client, script(request)) == script(expected)


# -- commands and batching ---------------------------------------------------------------

def test_version_echo_list_and_append(connect: Callable[[str], RacsClient]) -> None:
    alice = connect("alice")
    check(alice, """
        BEGIN v
        GET-VERSION
        END
        BEGIN
        END
        BEGIN
        SET-VERSION 0.2 APPEND
        ECHO hello world APPEND
        ECHO not kept
        LIST
        END
    """, """
        BEGIN v
        +002 001 0.2
        END
        BEGIN
        +001 000 ok
        END
        BEGIN
        +002 001 0.2
        +009 002 hello world
        +004 004 SE1 SE2 SE3
        END
    """)


def test_list_depends_on_cn(connect: Callable[[str], RacsClient]) -> None:
    check(connect("bob"), "BEGIN b\nLIST\nEND", "BEGIN b\n+004 001 SE2\nEND")
    check(connect("admin"), "BEGIN\nLIST\nEND", "BEGIN\n+004 001 SE1 SE2 SE3\nEND")
    check(connect("mallory"), "BEGIN\nLIST\nEND", "BEGIN\n+004 001\nEND")


def test_poweron_select_apdu_reset_shutdown(connect: Callable[[str], RacsClient],
                                            cards: dict[str, TestCard]) -> None:
    alice = connect("alice")
    check(alice, f"""
        BEGIN card
        POWERON SE1 APPEND
        APDU SE1 {SELECT} APPEND
        APDU SE1 00CA000003010203
        APDU SE1 00ca00000104
        END
        BEGIN again
        POWERON SE1
        RESET SE1 APPEND
        RESET SE1 WARM APPEND
        APDU SE1 {SELECT}
        SHUTDOWN SE1
        END
    """, f"""
        BEGIN card
        +008 001 {ATR}
        +006 002 9000
        +006 004 049000
        END
        BEGIN again
        +005 002 {ATR}
        +005 003 {ATR}
        +007 005 SE1 powered off
        END
    """)
    assert not cards["SE1"].powered
    assert bytes.fromhex("00CA000003010203") in cards["SE1"].apdus  # ran, result dropped


def test_continue_stops_the_batch(connect: Callable[[str], RacsClient],
                                  cards: dict[str, TestCard]) -> None:
    check(connect("alice"), f"""
        BEGIN c
        POWERON SE2
        APDU SE2 {SELECT} CONTINUE=9000 APPEND
        APDU SE2 0020000000 CONTINUE=9000
        APDU SE2 00CA000001AA
        END
        BEGIN after
        APDU SE2 0020000000
        END
    """, """
        BEGIN c
        -006 003 6982
        END
        BEGIN after
        +006 001 6982
        END
    """)
    assert bytes.fromhex("00CA000001AA") not in cards["SE2"].apdus  # dropped, never sent


def test_more_fetch_and_wrong_le(connect: Callable[[str], RacsClient],
                                 cards: dict[str, TestCard]) -> None:
    long_hex = (LONG_DATA + b"\x90\x00").hex().upper()
    check(connect("alice"), f"""
        BEGIN m
        POWERON SE1
        APDU SE1 {SELECT}
        APDU SE1 00CB000000 APPEND
        APDU SE1 00CB000000 MORE=61 APPEND
        APDU SE1 00CB000000 MORE=61 FETCH=80C00000 APPEND
        APDU SE1 00B0000000
        END
    """, f"""
        BEGIN m
        +006 003 6100
        +006 004 {long_hex}
        +006 005 {long_hex}
        +006 006 {bytes(range(16)).hex().upper()}9000
        END
    """)
    assert bytes.fromhex("80C0000000") in cards["SE1"].apdus
    assert bytes.fromhex("80C000002C") in cards["SE1"].apdus
    assert bytes.fromhex("00B0000010") in cards["SE1"].apdus  # retried with the card's Le


# -- every error class -------------------------------------------------------------------

def test_unknown_verb_ends_session(connect: Callable[[str], RacsClient]) -> None:
    alice = connect("alice")
    check(alice, "BEGIN x\nLIST\nFROB SE1\nEND", "BEGIN x\n-100 002 unknown command FROB\nEND")
    assert session_closed(alice)


def test_not_implemented(connect: Callable[[str], RacsClient]) -> None:
    check(connect("alice"), "BEGIN\nPOWERON SE3\nRESET SE3 WARM\nEND",
          "BEGIN\n-205 002 the element does not do this\nEND")


def test_line_before_begin_ends_session(connect: Callable[[str], RacsClient]) -> None:
    alice = connect("alice")
    check(alice, "LIST\nBEGIN\nEND", "BEGIN\n-300 000 waiting for BEGIN, got LIST\nEND")
    assert session_closed(alice)


def test_second_begin_ends_session(connect: Callable[[str], RacsClient]) -> None:
    alice = connect("alice")
    check(alice, "BEGIN a\nECHO 1\nBEGIN b\nEND",
          "BEGIN a\n-301 002 duplicate BEGIN\nEND\n<closed>")


def test_illegal_and_bad_parameter_and_syntax(connect: Callable[[str], RacsClient]) -> None:
    admin = connect("admin")
    check(admin, f"""
        BEGIN e1
        APDU SE1 {SELECT}
        END
        BEGIN e2
        POWERON SE9
        END
        BEGIN e3
        SET-VERSION 9.9
        END
        BEGIN e4
        APDU SE1 00A4ZZ
        END
        BEGIN e5
        APDU SE1 00A
        END
        BEGIN e6
        POWERON
        END
        BEGIN e7
        APDU SE1
        END
        BEGIN e8
        ECHO APPEND
        END
        BEGIN e9
        APDU SE1 00CA0000 LATER=1
        END
        BEGIN e10
        SET-VERSION
        END
        BEGIN e11
        RESET SE1 HOT
        END
        BEGIN {"n" * 65}
        END
        BEGIN ok
        ECHO still alive
        END
    """, """
        BEGIN e1
        -306 001 SEID SE1 is powered off, POWERON is required
        END
        BEGIN e2
        -408 001 unknown SEID SE9
        END
        BEGIN e3
        -402 001 version 9.9 is not supported
        END
        BEGIN e4
        -406 001 APDU is not hex: 00A4ZZ
        END
        BEGIN e5
        -406 001 APDU is not hex: 00A
        END
        BEGIN e6
        -508 001 POWERON needs a SEID
        END
        BEGIN e7
        -506 001 APDU needs a SEID and a hex APDU
        END
        BEGIN e8
        -509 001 ECHO needs a value
        END
        BEGIN e9
        -506 001 unknown APDU option LATER=1
        END
        BEGIN e10
        -502 001 SET-VERSION needs a version
        END
        BEGIN e11
        -505 001 RESET <SEID> [WARM]
        END
        BEGIN
        -401 000 request name longer than 64
        END
        BEGIN ok
        +009 001 still alive
        END
    """)


def test_non_ascii_and_oversize_lines(connect: Callable[[str], RacsClient]) -> None:
    alice = connect("alice")
    # Raw bytes: the client API sends ASCII only, so write through the TLS socket.
    assert alice._socket is not None
    alice._socket.sendall(b"BEGIN a\nECHO x\nECHO caf\xc3\xa9\nEND\nBEGIN b\nECHO "
                          + b"A" * (MAX_LINE + 10) + b"\nEND\nBEGIN c\nECHO fine\nEND\n")
    deadline = time.monotonic() + 5
    lines = [alice.read_line(deadline) for _ in range(9)]
    assert lines == ["BEGIN a", "-500 002 line is not printable ASCII", "END",
                     "BEGIN b", f"-500 001 line longer than {MAX_LINE} bytes", "END",
                     "BEGIN c", "+009 001 fine", "END"]


def test_cn_authorization(connect: Callable[[str], RacsClient]) -> None:
    check(connect("bob"), "BEGIN\nPOWERON SE1\nEND", "BEGIN\n-608 001 SEID SE1 is not yours\nEND")
    check(connect("bob"), "BEGIN\nAPDU SE3 00CA0000\nEND",
          "BEGIN\n-606 001 SEID SE3 is not yours\nEND")
    check(connect("mallory"), "BEGIN\nRESET SE2\nEND",
          "BEGIN\n-605 001 SEID SE2 is not yours\nEND")
    # An unknown SEID that is not yours looks like any other that is not yours.
    check(connect("bob"), "BEGIN\nSHUTDOWN SE9\nEND",
          "BEGIN\n-607 001 SEID SE9 is not yours\nEND")


def test_apdu_filters_and_select_first(connect: Callable[[str], RacsClient],
                                       cards: dict[str, TestCard]) -> None:
    check(connect("alice"), f"""
        BEGIN f1
        POWERON SE1
        APDU SE1 00CA000001AA
        END
        BEGIN f2
        APDU SE1 {SELECT}
        APDU SE1 0020008008313233343536FFFF
        END
        BEGIN f3
        APDU SE1 0320008000
        END
        BEGIN f4
        APDU SE1 {SELECT_OTHER} APPEND
        APDU SE1 00CA000001AA
        END
    """, """
        BEGIN f1
        -606 002 SEID SE1: no application selected
        END
        BEGIN f2
        -606 002 APDU 00200080 refused by filter
        END
        BEGIN f3
        -606 001 APDU 03200080 refused by filter
        END
        BEGIN f4
        +006 001 6A82
        +006 002 AA9000
        END
    """)
    assert not any(apdu[1] == 0x20 for apdu in cards["SE1"].apdus)
    check(connect("bob"), f"""
        BEGIN b
        POWERON SE2
        APDU SE2 {SELECT_OTHER}
        END
        BEGIN b2
        APDU SE2 {SELECT}
        APDU SE2 0020000000
        END
    """, f"""
        BEGIN b
        -606 002 SELECT of AID {OTHER_AID.hex().upper()} refused
        END
        BEGIN b2
        +006 002 6982
        END
    """)


def test_locking_between_sessions(connect: Callable[[str], RacsClient]) -> None:
    alice, bob = connect("alice"), connect("bob")
    check(alice, "BEGIN\nPOWERON SE2\nEND", f"BEGIN\n+008 001 {ATR}\nEND")
    check(alice, "BEGIN\nPOWERON SE2\nEND", f"BEGIN\n+008 001 {ATR}\nEND")  # already mine
    check(bob, f"""
        BEGIN
        POWERON SE2
        END
        BEGIN
        APDU SE2 {SELECT}
        END
        BEGIN
        RESET SE2
        END
        BEGIN
        SHUTDOWN SE2
        END
    """, """
        BEGIN
        -708 001 SEID SE2 is in use by another session, SHUTDOWN is required
        END
        BEGIN
        -706 001 SEID SE2 is in use by another session, SHUTDOWN is required
        END
        BEGIN
        -705 001 SEID SE2 is in use by another session, SHUTDOWN is required
        END
        BEGIN
        -707 001 SEID SE2 is in use by another session, SHUTDOWN is required
        END
    """)
    check(alice, "BEGIN\nSHUTDOWN SE2\nEND", "BEGIN\n+007 001 SE2 powered off\nEND")
    check(bob, "BEGIN\nPOWERON SE2\nEND", f"BEGIN\n+008 001 {ATR}\nEND")
    bob.close()  # session end powers off and unlocks
    deadline = time.monotonic() + 3
    while True:
        reply = converse(alice, "BEGIN\nPOWERON SE2\nEND")
        if "+008" in reply or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reply == f"BEGIN\n+008 001 {ATR}\nEND\n"


def test_hardware_and_system_errors(connect: Callable[[str], RacsClient],
                                    cards: dict[str, TestCard]) -> None:
    alice = connect("alice")
    check(alice, f"""
        BEGIN h
        POWERON SE1
        APDU SE1 {SELECT}
        APDU SE1 00ED0000
        END
        BEGIN s
        APDU SE1 00EF0000
        END
    """, """
        BEGIN h
        -806 003 reader unplugged
        END
        BEGIN s
        -906 001 system error
        END
    """)
    started = time.monotonic()
    check(alice, "BEGIN\nAPDU SE1 00EE0000\nEND",
          "BEGIN\n-806 001 element SE1 did not answer within 1 s\nEND")
    assert time.monotonic() - started < 3
    check(alice, "BEGIN\nAPDU SE1 00CA000001AA\nEND",
          "BEGIN\n-806 001 element SE1 is still busy with a call that did not finish "
          "within its deadline\nEND")
    check(connect("bob"), "BEGIN\nGET-VERSION\nEND", "BEGIN\n+002 001 0.2\nEND")
    cards["SE1"].release.set()
    time.sleep(0.1)
    check(alice, "BEGIN\nAPDU SE1 00CA000001AA\nEND", "BEGIN\n+006 001 AA9000\nEND")


def test_idle_timeout_powers_off(pki: Pki) -> None:
    card = TestCard()
    server = ServerThread(make_config(pki, {"SE1": card}, idle_timeout=0.5)).start()
    try:
        alice = client_for(server, pki, "alice")
        check(alice, "BEGIN\nPOWERON SE1\nEND", f"BEGIN\n+008 001 {ATR}\nEND")
        assert card.powered
        assert session_closed(alice, timeout=3)
        time.sleep(0.1)
        assert not card.powered
        check(client_for(server, pki, "admin"), "BEGIN\nPOWERON SE1\nEND",
              f"BEGIN\n+008 001 {ATR}\nEND")
    finally:
        server.stop()


# -- TLS ---------------------------------------------------------------------------------

def test_client_certificate_is_mandatory(racs: ServerThread, pki: Pki, tmp_path: Path) -> None:
    assert not tls_refused(racs.port, pki.ca, pki.clients["alice"])
    assert tls_refused(racs.port, pki.ca, None)
    stranger = make_pki(tmp_path, ["alice"]).clients["alice"]  # same CN, another CA
    assert tls_refused(racs.port, pki.ca, stranger)
    assert racs.alive()
    with socket.create_connection(("127.0.0.1", racs.port), timeout=5) as raw:
        raw.sendall(b"BEGIN\nLIST\nEND\n")  # plain text to a TLS port: no RACS answer
        try:
            assert not raw.recv(100).startswith(b"BEGIN")
        except ConnectionResetError:
            pass
    check(client_for(racs, pki, "alice"), "BEGIN\nGET-VERSION\nEND", "BEGIN\n+002 001 0.2\nEND")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_s_client_by_hand(racs: ServerThread, pki: Pki) -> None:
    identity = pki.clients["alice"]
    process = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{racs.port}", "-cert",
         str(identity.cert), "-key", str(identity.key), "-CAfile", str(pki.ca), "-quiet",
         "-verify_return_error"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdin is not None and process.stdout is not None
    try:
        for line in ["BEGIN hand", "LIST APPEND", "POWERON SE1 APPEND", f"APDU SE1 {SELECT}",
                     "END", "BEGIN bye", "RESET SE1 WARM", "SHUTDOWN SE1", "END"]:
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()
        got: list[str] = []
        timer = threading.Timer(10, process.kill)
        timer.start()
        while got.count("END") < 2:
            raw = process.stdout.readline()
            if not raw:
                break
            got.append(raw.decode().rstrip("\r\n"))
        timer.cancel()
    finally:
        process.kill()
        process.wait(5)
    assert got == ["BEGIN hand", "+004 001 SE1 SE2 SE3", f"+008 002 {ATR}", "+006 003 9000",
                   "END", "BEGIN bye", "+007 002 SE1 powered off", "END"]


# -- the APDU transport over RACS --------------------------------------------------------

def transport(server: ServerThread, pki: Pki, cn: str, seid: str) -> RacsTransport:
    identity = pki.clients[cn]
    return RacsTransport(seid, "127.0.0.1", server.port, identity.cert, identity.key, pki.ca,
                         deadline=3.0)


def test_racs_transport(racs: ServerThread, pki: Pki, cards: dict[str, TestCard]) -> None:
    card = transport(racs, pki, "alice", "SE1")
    assert card.name == f"racs://127.0.0.1:{racs.port}/SE1"
    assert card.connect() == TEST_ATR
    assert card.transmit(bytes.fromhex(SELECT)) == b"\x90\x00"
    assert card.transmit(bytes.fromhex("00CB000000")) == LONG_DATA + b"\x90\x00"
    assert card.reset(warm=True) == TEST_ATR
    assert card.transmit(bytes.fromhex(SELECT)) == b"\x90\x00"
    with pytest.raises(TransportFailure, match="-606"):
        card.transmit(bytes.fromhex("0020000000"))  # VERIFY is filtered for alice on SE1
    card.disconnect()
    card.disconnect()
    assert not cards["SE1"].powered
    with pytest.raises(CardAbsent, match="-608"):
        transport(racs, pki, "bob", "SE1").connect()
    stuck = transport(racs, pki, "alice", "SE2")
    stuck.connect()
    stuck.transmit(bytes.fromhex(SELECT))
    with pytest.raises(TransportFailure, match="-806"):
        stuck.transmit(bytes.fromhex("00EE0000"))
    cards["SE2"].release.set()
    stuck.disconnect()


def test_racs_transport_reconnects(pki: Pki) -> None:
    card_behind = TestCard()
    server = ServerThread(make_config(pki, {"SE1": card_behind}, idle_timeout=0.4)).start()
    try:
        card = transport(server, pki, "alice", "SE1")
        card.connect()
        assert card.transmit(bytes.fromhex(SELECT)) == b"\x90\x00"
        time.sleep(1.0)  # the server ends the idle session and powers the card off
        assert card.transmit(bytes.fromhex(SELECT)) == b"\x90\x00"
        assert card.transmit(bytes.fromhex("00CA000001AA")) == b"\xaa\x90\x00"
        port = server.port
        server.stop()
        with pytest.raises(TransportFailure):
            card.transmit(bytes.fromhex(SELECT))
        assert port
        card.disconnect()
    finally:
        if server.alive():
            server.stop()


# -- CLI and config ----------------------------------------------------------------------

def test_cli_script_and_config(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                               ) -> None:
    config = tmp_path / "racs.toml"
    config.write_text(f"""
[server]
port = 0
cert = "{pki.server.cert}"
key = "{pki.server.key}"
ca = "{pki.ca}"
idle_timeout = 5
card_deadline = 2

[elements.SE1]
factory = "tests.racs_cards:TestCard"
args = {{ name = "card one" }}

[elements.SE2]
factory = "tests.racs_cards:TestCard"

[users]
alice = ["SE1"]
admin = "all"

[[filters]]
cn = "alice"
seid = "*"
aids = ["{TEST_AID.hex()}"]
deny = [{{ mask = "FFFF0000", value = "00200000" }}]
""")
    loaded = load_config(config)
    assert sorted(loaded.elements) == ["SE1", "SE2"]
    server = ServerThread(loaded).start()
    try:
        parser = argparse.ArgumentParser(prog="p11grid")
        cli.register(parser.add_subparsers(dest="command"))
        requests = tmp_path / "requests.txt"
        requests.write_text(f"BEGIN s\nLIST APPEND\nPOWERON SE1 APPEND\nAPDU SE1 {SELECT}\n"
                            "END\nBEGIN t\nAPDU SE1 0020000000\nEND\n")
        identity = pki.clients["alice"]
        args = parser.parse_args(["racs", "--server", f"127.0.0.1:{server.port}", "--cert",
                                  str(identity.cert), "--key", str(identity.key), "--ca",
                                  str(pki.ca), str(requests)])
        assert args.func(args) == 1  # the second request fails
        assert capsys.readouterr().out == (
            f"BEGIN s\n+004 001 SE1\n+008 002 {ATR}\n+006 003 9000\nEND\n"
            "BEGIN t\n-606 001 APDU 00200000 refused by filter\nEND\n")
        serve_args = parser.parse_args(["racs-serve", "--config", str(config)])
        assert serve_args.func is cli.run_server
    finally:
        server.stop()


# -- junk ----------------------------------------------------------------------------------

_TOKENS = ["BEGIN", "END", "APDU", "POWERON", "SHUTDOWN", "RESET", "WARM", "LIST", "ECHO",
           "GET-VERSION", "SET-VERSION", "0.2", "SE1", "SE2", "SE9", SELECT, "00CA000001AA",
           "00CB000000", "0020000000", "MORE=61", "MORE=6", "CONTINUE=9000", "CONTINUE=",
           "FETCH=00C00000", "FETCH=zz", "APPEND", "x" * 70, "\t", "=", "0"]
_RESULT = re.compile(r"^[+-]\d{3} \d{3}( .*)?$")


def well_formed(reply: bytes) -> bool:
    text = reply.decode("ascii")
    if not text.endswith("\r\n"):
        return False
    lines = text[:-2].split("\r\n")
    parsed = Reply.parse(lines)
    return all(_RESULT.match(line) for line in lines[1:-1]) and (
        parsed.ok or len(parsed.results) == 1)


junk_line = st.one_of(
    st.binary(max_size=60),
    st.lists(st.sampled_from(_TOKENS), min_size=0, max_size=6).map(
        lambda tokens: " ".join(tokens).encode()),
)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(junk_line, max_size=25))
def test_engine_survives_junk(lines: list[bytes]) -> None:
    async def feed() -> None:
        hub = ElementHub({"SE1": TestCard(), "SE2": TestCard()}, deadline=1.0)
        session = RacsSession("alice", TableAuthorizer.from_mapping(USERS, RULES), hub)
        other = RacsSession("bob", TableAuthorizer.from_mapping(USERS, RULES), hub)
        for number, line in enumerate([b"BEGIN", *lines]):
            target = other if number % 7 == 3 else session
            step = await target.handle_line(line + b"\n")
            if step.reply is not None:
                assert well_formed(step.reply), step.reply
        await session.close()
        await other.close()
        assert all(element.owner is None for element in hub.elements.values())

    asyncio.run(feed())


def test_server_survives_raw_junk(racs: ServerThread, pki: Pki) -> None:
    generator = random.Random(7)
    identity = pki.clients["alice"]
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(identity.cert), str(identity.key))
    stop_at = time.monotonic() + 2
    rounds = 0
    while time.monotonic() < stop_at and rounds < 40:
        rounds += 1
        pieces = [b"BEGIN\n"] if generator.random() < 0.5 else []
        for _ in range(generator.randint(1, 8)):
            kind = generator.random()
            if kind < 0.4:
                pieces.append(os.urandom(generator.randint(0, 200)) + b"\n")
            elif kind < 0.6:
                pieces.append(" ".join(generator.choices(_TOKENS, k=4)).encode() + b"\n")
            elif kind < 0.7:
                pieces.append(b"Z" * (MAX_LINE * 3) + b"\n")
            else:
                pieces.append(os.urandom(generator.randint(0, 3000)))
        with socket.create_connection(("127.0.0.1", racs.port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            received = b""
            try:
                tls.sendall(b"".join(pieces))
                tls.settimeout(0.3)
                while len(received) < 1_000_000:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except (TimeoutError, ssl.SSLError, OSError):
                pass
        for line in received.split(b"\r\n")[:-1]:
            text = line.decode("ascii")
            assert text == "END" or text.startswith("BEGIN") or _RESULT.match(text), text
    assert racs.alive()
    check(client_for(racs, pki, "alice"), "BEGIN\nGET-VERSION\nEND", "BEGIN\n+002 001 0.2\nEND")
