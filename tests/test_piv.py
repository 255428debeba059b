"""The virtual PIV card, the PC/SC transport and the PIV driver, against real peers.

pcscd, vpcd and two virtual cards run in a network namespace of their own (see
grid_backend/virtual_piv/launcher.py); this process and pkcs11-tool reach pcscd through
its unix socket, named by PCSCLITE_CSOCK_NAME. libpcsclite reads that variable once per
process, so every PC/SC user in this pytest process talks to this fixture's pcscd.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11.constants import Attribute, ObjectClass
from pkcs11.mechanisms import KeyType, Mechanism

from grid_backend.apdu import CardAbsent, TransportFailure
from grid_backend.elements.piv_card import PivCard
from grid_backend.secure_element import (
    ElementObject,
    InputRefused,
    MechanismRefused,
    NotLoggedIn,
    PinIncorrect,
    PinInvalid,
    PinLocked,
)
from grid_backend.transports.pcsc import PcscTransport
from grid_backend.virtual_piv import tlv
from grid_backend.virtual_piv.applet import PivApplet
from grid_backend.virtual_piv.issue import exchange
from grid_backend.virtual_piv.launcher import (
    LauncherFailed,
    client_socket,
    launch,
    stop,
    wait_until_ready,
)
from grid_backend.virtual_piv.state import CardState
from p11grid.ca import create_ca

ROOT = Path(__file__).resolve().parent.parent
OPENSC = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
PIN = "123456"
THROWAWAY_PIN = "87654321"
MAIN_READER = "Virtual PCD 00 00"
THROWAWAY_READER = "Virtual PCD 00 01"
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@dataclass
class Cards:
    work: Path
    socket: str
    pcscd_pid: int
    ca_certificate: x509.Certificate
    environ: dict[str, str]


def _require_tools() -> None:
    missing = [tool for tool in ("unshare", "pcscd", "ip", "pkcs11-tool")
               if shutil.which(tool) is None]
    missing += [path for path in (VPCD_DRIVER, OPENSC) if not os.path.exists(path)]
    if missing:
        pytest.fail(f"PIV tests need {', '.join(missing)} (make install: vsmartcard-vpcd, "
                    "pcscd, opensc, util-linux, iproute2)")
    if os.geteuid() != 0:
        pytest.fail("PIV tests need root for `unshare --net --mount`")


def _wait_for_cards(readers: tuple[str, ...], deadline: float) -> None:
    from smartcard import scard

    last = "nothing yet"
    while time.monotonic() < deadline:
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult == scard.SCARD_S_SUCCESS:
            try:
                hresult, states = scard.SCardGetStatusChange(
                    context, 0, [(reader, scard.SCARD_STATE_UNAWARE) for reader in readers])
                if hresult == scard.SCARD_S_SUCCESS and all(
                        state & scard.SCARD_STATE_PRESENT for _, state, _ in states):
                    return
                last = f"states {states}" if hresult == scard.SCARD_S_SUCCESS \
                    else f"status 0x{hresult & 0xFFFFFFFF:X}"
            finally:
                scard.SCardReleaseContext(context)
        time.sleep(0.1)
    raise TimeoutError(last)


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cards]:
    _require_tools()
    work = tmp_path_factory.mktemp("piv")
    ca = create_ca(work / "ca.key", work / "ca.pem", "piv test CA")
    python = sys.executable
    # The main card through the CLI, CA-signed; the throwaway one (PIN blocking) self-signed.
    for args in (
        ["--state", str(work / "main"), "--pin", PIN, "--keys", "9a:rsa2048,9c:ec256,9d:rsa2048",
         "--subject", "CN=piv-rsa", "--ca-cert", str(work / "ca.pem"), "--ca-key",
         str(work / "ca.key"), "--dns", "localhost"],
        ["--state", str(work / "throwaway"), "--pin", THROWAWAY_PIN, "--keys", "9a:ec256",
         "--subject", "CN=throwaway"],
    ):
        done = subprocess.run([python, "-m", "grid_backend.virtual_piv", "init", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            pytest.fail(f"virtual_piv init failed: {done.stderr}")
    launcher = launch(work, [(work / "main", 35963), (work / "throwaway", 35964)],
                      work / "launcher.log")
    socket = str(client_socket(work))
    previous = os.environ.get("PCSCLITE_CSOCK_NAME")
    os.environ["PCSCLITE_CSOCK_NAME"] = socket
    try:
        deadline = time.monotonic() + 20
        try:
            wait_until_ready(launcher, work, work / "launcher.log")
        except LauncherFailed as exc:
            pytest.fail(str(exc))
        try:
            _wait_for_cards((MAIN_READER, THROWAWAY_READER), deadline)
        except TimeoutError as exc:
            logs = "".join(p.read_text() for p in sorted(work.glob("*.log")))
            pytest.fail(f"the virtual cards did not appear in pcscd ({exc}): {logs}")
        yield Cards(work, socket, int((work / "pcscd.pid").read_text()), ca.certificate,
                    {**os.environ, "PCSCLITE_CSOCK_NAME": socket})
    finally:
        # Only the launcher's own process group: unshare execs the launcher, which stops
        # its cards and pcscd on SIGTERM.
        stop(launcher)
        if previous is None:
            os.environ.pop("PCSCLITE_CSOCK_NAME", None)
        else:
            os.environ["PCSCLITE_CSOCK_NAME"] = previous


class RecordingTransport(PcscTransport):
    """PC/SC, with every APDU exchanged kept for inspection."""

    def __init__(self, reader: str) -> None:
        super().__init__(reader, timeout=5.0, connect_timeout=5.0)
        self.exchanges: list[tuple[bytes, bytes]] = []

    def transmit(self, apdu: bytes) -> bytes:
        response = super().transmit(apdu)
        self.exchanges.append((apdu, response))
        return response


@pytest.fixture
def main_card(cards: Cards) -> Iterator[PivCard]:
    card = PivCard(RecordingTransport(MAIN_READER), labels={0x9A: "piv-rsa"})
    card.open()
    yield card
    card.close()


def _object(card: PivCard, object_class: int, object_id: bytes,
            private: bool = False) -> ElementObject:
    objects = card.private_objects() if private else card.public_objects()
    for obj in objects:
        if obj.attributes[Attribute.CLASS] == int(object_class).to_bytes(8, sys.byteorder) \
                and obj.attributes[Attribute.ID] == object_id:
            return obj
    raise AssertionError(f"no object of class {object_class} with id {object_id.hex()}")


def _certificate(card: PivCard, object_id: bytes) -> x509.Certificate:
    obj = _object(card, ObjectClass.CERTIFICATE, object_id)
    return x509.load_der_x509_certificate(obj.attributes[Attribute.VALUE])


def _pkcs11_tool(cards: Cards, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["pkcs11-tool", "--module", OPENSC, *args], env=cards.environ,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr + done.stdout
    return done


# OpenSC's PIV driver: the peer that proves the card is a PIV card -----------------------

def test_opensc_lists_the_cards_objects(cards: Cards) -> None:
    listing = _pkcs11_tool(cards, "--slot-description", MAIN_READER, "-O").stdout
    for expected in ("Certificate for PIV Authentication", "Certificate for Digital Signature",
                     "Certificate for Key Management", "PIV AUTH pubkey", "SIGN pubkey",
                     "Card Holder Unique Identifier", "EC_POINT 256 bits", "RSA 2048 bits"):
        assert expected in listing
    logged_in = _pkcs11_tool(cards, "--slot-description", MAIN_READER, "--login", "--pin", PIN,
                             "-O", "--type", "privkey").stdout
    assert "PIV AUTH key" in logged_in and "SIGN key" in logged_in


def test_opensc_signs_with_rsa_and_ecdsa(cards: Cards, tmp_path: Path) -> None:
    message = tmp_path / "message"
    message.write_bytes(b"signed by a virtual PIV card through OpenSC")
    _pkcs11_tool(cards, "--slot-description", MAIN_READER, "--read-object", "--type", "cert",
                 "--id", "01", "-o", str(tmp_path / "9a.der"))
    _pkcs11_tool(cards, "--slot-description", MAIN_READER, "--read-object", "--type", "cert",
                 "--id", "02", "-o", str(tmp_path / "9c.der"))
    rsa_certificate = x509.load_der_x509_certificate((tmp_path / "9a.der").read_bytes())
    ec_certificate = x509.load_der_x509_certificate((tmp_path / "9c.der").read_bytes())
    assert rsa_certificate.issuer == cards.ca_certificate.subject

    _pkcs11_tool(cards, "--slot-description", MAIN_READER, "--login", "--pin", PIN, "--sign",
                 "-m", "SHA256-RSA-PKCS", "--id", "01", "-i", str(message),
                 "-o", str(tmp_path / "rsa.sig"))
    rsa_key = rsa_certificate.public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey)
    rsa_key.verify((tmp_path / "rsa.sig").read_bytes(), message.read_bytes(),
                   padding.PKCS1v15(), hashes.SHA256())

    digest = tmp_path / "digest"
    digest.write_bytes(hashlib.sha256(message.read_bytes()).digest())
    _pkcs11_tool(cards, "--slot-description", MAIN_READER, "--login", "--pin", PIN, "--sign",
                 "-m", "ECDSA", "--id", "02", "-i", str(digest), "-o", str(tmp_path / "ec.sig"))
    raw = (tmp_path / "ec.sig").read_bytes()
    assert len(raw) == 64
    ec_key = ec_certificate.public_key()
    assert isinstance(ec_key, ec.EllipticCurvePublicKey)
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                     int.from_bytes(raw[32:], "big"))
    ec_key.verify(der, message.read_bytes(), ec.ECDSA(hashes.SHA256()))


# The driver over PC/SC ------------------------------------------------------------------

def test_driver_objects(main_card: PivCard) -> None:
    public = main_card.public_objects()
    assert len(public) == 6  # certificate and public key of 9A, 9C, 9D
    certificate = _certificate(main_card, b"\x01")
    rsa_public = _object(main_card, ObjectClass.PUBLIC_KEY, b"\x01")
    numbers = certificate.public_key().public_numbers()  # type: ignore[union-attr]
    assert int.from_bytes(rsa_public.attributes[Attribute.MODULUS], "big") == numbers.n
    assert rsa_public.attributes[Attribute.LABEL] == b"piv-rsa"
    cert_object = _object(main_card, ObjectClass.CERTIFICATE, b"\x01")
    assert cert_object.attributes[Attribute.SUBJECT] == certificate.subject.public_bytes()
    assert cert_object.attributes[Attribute.ISSUER] == certificate.issuer.public_bytes()
    assert cert_object.attributes[Attribute.SERIAL_NUMBER][0] == 0x02
    ec_public = _object(main_card, ObjectClass.PUBLIC_KEY, b"\x02")
    assert ec_public.attributes[Attribute.EC_PARAMS] == bytes.fromhex("06082a8648ce3d030107")
    point = _certificate(main_card, b"\x02").public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert ec_public.attributes[Attribute.EC_POINT] == b"\x04\x41" + point
    assert ec_public.attributes[Attribute.LABEL] == b"SIGN key"
    with pytest.raises(NotLoggedIn):
        main_card.private_objects()
    main_card.login(PIN)
    private = main_card.private_objects()
    assert len(private) == 3
    rsa_private = _object(main_card, ObjectClass.PRIVATE_KEY, b"\x01", private=True)
    assert rsa_private.attributes[Attribute.KEY_TYPE] == int(KeyType.RSA).to_bytes(
        8, sys.byteorder)
    assert rsa_private.attributes[Attribute.SIGN] == b"\x01"
    assert rsa_private.attributes[Attribute.DECRYPT] == b"\x01"
    ec_private = _object(main_card, ObjectClass.PRIVATE_KEY, b"\x02", private=True)
    assert ec_private.attributes[Attribute.DECRYPT] == b"\x00"
    assert main_card.mechanisms() == {Mechanism.RSA_X_509, Mechanism.ECDSA}


def test_driver_login_wrong_then_right(main_card: PivCard) -> None:
    with pytest.raises(PinIncorrect, match="2 tries left"):
        main_card.login("000000")
    with pytest.raises(PinInvalid):
        main_card.login("12ab")
    main_card.login(PIN)  # a right PIN restores the counter
    main_card.logout()
    with pytest.raises(PinIncorrect, match="2 tries left"):
        main_card.login("000000")
    main_card.login(PIN)


def test_driver_pin_blocks_after_three_wrong_tries(cards: Cards) -> None:
    card = PivCard(PcscTransport(THROWAWAY_READER, timeout=5.0))
    card.open()
    try:
        with pytest.raises(PinIncorrect, match="2 tries left"):
            card.login("11111111")
        with pytest.raises(PinIncorrect, match="1 tries left"):
            card.login("11111111")
        with pytest.raises(PinLocked):
            card.login("11111111")
        with pytest.raises(PinLocked):
            card.login(THROWAWAY_PIN)  # blocked: even the right PIN is refused
    finally:
        card.close()


def test_driver_raw_rsa_signature_with_chaining(main_card: PivCard) -> None:
    main_card.login(PIN)
    key = _object(main_card, ObjectClass.PRIVATE_KEY, b"\x01", private=True)
    message = b"a TLS handshake, say"
    info = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info
    transport = main_card.transport
    assert isinstance(transport, RecordingTransport)
    transport.exchanges.clear()
    signature = main_card.sign(key, Mechanism.RSA_X_509, None, block)
    public_key = _certificate(main_card, b"\x01").public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    # 256 bytes in a template need command chaining; 264 bytes back need GET RESPONSE.
    apdus = [apdu for apdu, _ in transport.exchanges]
    assert any(apdu[0] == 0x10 and apdu[1] == 0x87 for apdu in apdus)
    assert any(response[-2] == 0x61 for _, response in transport.exchanges)
    assert any(apdu[1] == 0xC0 for apdu in apdus)
    with pytest.raises(InputRefused):
        main_card.sign(key, Mechanism.RSA_X_509, None, b"\xff" * 256)  # not below n
    with pytest.raises(MechanismRefused):
        main_card.sign(key, Mechanism.ECDSA, None, b"\x01" * 32)


def test_driver_ecdsa_signature_is_r_and_s(main_card: PivCard) -> None:
    main_card.login(PIN)
    key = _object(main_card, ObjectClass.PRIVATE_KEY, b"\x02", private=True)
    public_key = _certificate(main_card, b"\x02").public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    for message in (b"first", b"second"):  # 9C wants a VERIFY before each signature
        digest = hashlib.sha256(message).digest()
        signature = main_card.sign(key, Mechanism.ECDSA, None, digest)
        assert len(signature) == 64
        der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                         int.from_bytes(signature[32:], "big"))
        public_key.verify(der, message, ec.ECDSA(hashes.SHA256()))


def test_driver_raw_rsa_decryption(main_card: PivCard) -> None:
    main_card.login(PIN)
    for object_id in (b"\x01", b"\x03"):
        key = _object(main_card, ObjectClass.PRIVATE_KEY, object_id, private=True)
        public_key = _certificate(main_card, object_id).public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        ciphertext = public_key.encrypt(b"session key " + object_id, padding.PKCS1v15())
        block = main_card.decrypt(key, Mechanism.RSA_X_509, None, ciphertext)
        assert len(block) == 256 and block[:2] == b"\x00\x02"
        assert block[block.index(b"\x00", 2) + 1:] == b"session key " + object_id


def test_driver_needs_login_and_gives_random(main_card: PivCard) -> None:
    assert main_card.random(0) == b""
    random = main_card.random(300)
    assert len(random) == 300 and random != main_card.random(300)
    main_card.logout()
    with pytest.raises(NotLoggedIn):
        main_card.private_objects()


def test_transport_failures_are_bounded(cards: Cards) -> None:
    with pytest.raises(CardAbsent):
        PcscTransport("no such reader", connect_timeout=2.0).connect()
    transport = PcscTransport(MAIN_READER, timeout=1.0, connect_timeout=1.0)
    transport.connect()
    os.kill(cards.pcscd_pid, signal.SIGSTOP)  # a stuck pcscd: calls must not hang
    try:
        started = time.monotonic()
        with pytest.raises(TransportFailure, match="no answer"):
            transport.transmit(bytes.fromhex("00A4040005A000000308"))
        assert time.monotonic() - started < 2.5
    finally:
        os.kill(cards.pcscd_pid, signal.SIGCONT)
    transport.connect()  # a fresh context and card handle after the failure
    response = transport.transmit(bytes.fromhex("00A4040005A000000308"))
    assert response[-2:] == b"\x90\x00"
    transport.disconnect()


# The applet's status words, without PC/SC ------------------------------------------------

@pytest.fixture(scope="module")
def local_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grid_backend.virtual_piv.issue import initialize_card, parse_key_requests

    directory = tmp_path_factory.mktemp("local") / "card"
    initialize_card(directory, PIN, parse_key_requests("9a:ec256,9c:ec256"), "CN=local")
    return directory


def _sw(card: PivApplet, apdu: str) -> int:
    return int.from_bytes(card.process(bytes.fromhex(apdu.replace(" ", "")))[-2:], "big")


def test_applet_status_words(local_card: Path) -> None:
    card = PivApplet(CardState.load(local_card))
    card.power_on()
    assert _sw(card, "00 A4 04 00 05 A000000309") == 0x6A82  # another AID
    assert _sw(card, "00 A4 04 00 05 A000000308 00") == 0x9000
    assert _sw(card, "00 FF 00 00") == 0x6D00
    assert _sw(card, "80 CB 3F FF 05 5C 03 5FC105 00") == 0x6E00
    assert _sw(card, "00 CB 3F FF 05 5C 03 5FC105") >> 8 == 0x61  # more than 256 bytes
    assert _sw(card, "00 CB 3F FF 05 5C 03 5FC10B 00") == 0x6A82  # 9D has no certificate
    assert _sw(card, "00 CB 3F FE 05 5C 03 5FC105 00") == 0x6A86
    assert _sw(card, "00 CB 3F FF 09 5C 03 5FC105") == 0x6700  # Lc beyond the data
    assert _sw(card, "00 20 00 80") == 0x63C3  # status query: 3 tries
    assert _sw(card, "00 20 00 80 04 31323334") == 0x6A80  # not 8 bytes
    assert _sw(card, "00 20 00 81 08 313233343536FFFF") == 0x6A88  # no PUK here
    challenge = tlv.tlv(0x7C, tlv.tlv(0x82, b"") + tlv.tlv(0x81, b"\x01" * 32))
    general_authenticate = "00 87 11 9A" + f"{len(challenge):02X}" + challenge.hex() + "00"
    assert _sw(card, general_authenticate) == 0x6982  # no PIN yet
    assert _sw(card, "00 87 07 9A" + general_authenticate[11:]) == 0x6A86  # wrong algorithm
    assert _sw(card, "00 87 11 9D" + general_authenticate[11:]) == 0x6A88  # empty slot
    assert _sw(card, "00 20 00 80 08 313233343536FFFF") == 0x9000
    assert _sw(card, general_authenticate) == 0x9000
    signature_9c = "00 87 11 9C" + general_authenticate[11:]
    assert _sw(card, signature_9c) == 0x9000  # VERIFY came before
    assert _sw(card, signature_9c) == 0x6982  # once per VERIFY
    assert _sw(card, "00 DB 3F FF 07 5C 03 5FC10B 53 00") == 0x6982  # PUT DATA is admin's
    assert _sw(card, "00 47 00 9D 05 AC 03 80 01 11") == 0x6982  # so is GENERATE
    assert _sw(card, "00 C0 00 00 00") == 0x6985  # nothing to GET RESPONSE
    assert _sw(card, "00 A4 04 00 05 A000000308") == 0x9000  # SELECT forgets the PIN
    assert _sw(card, general_authenticate) == 0x6982


def test_applet_retry_counter_survives_a_restart(local_card: Path) -> None:
    card = PivApplet(CardState.load(local_card))
    card.power_on()
    assert _sw(card, "00 20 00 80 08 393939393939FFFF") == 0x63C2
    restarted = PivApplet(CardState.load(local_card))
    restarted.power_on()
    assert _sw(restarted, "00 20 00 80") == 0x63C2
    assert exchange(restarted, bytes.fromhex("00200080"), PIN.encode() + b"\xff\xff") == b""
    assert _sw(restarted, "00 20 00 80") == 0x9000
    assert (local_card / "card.json").stat().st_mode & 0o777 == 0o600


# The vpicc side: a stand-in vpcd on loopback ----------------------------------------------

def _vpcd_message(connection: socket.socket, payload: bytes, answered: bool = True) -> bytes:
    connection.sendall(len(payload).to_bytes(2, "big") + payload)
    if not answered:
        return b""
    length = int.from_bytes(_read(connection, 2), "big")
    return _read(connection, length)


def _read(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        assert chunk, "the card closed the connection"
        data += chunk
    return data


def test_card_reconnects_to_vpcd_and_stops_on_sigterm(local_card: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "grid_backend.virtual_piv", "--state", str(local_card),
         "--vpcd", f"127.0.0.1:{port}"], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        for _ in range(2):  # the second round: vpcd went away and came back
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(10)
                _vpcd_message(connection, b"\x01", answered=False)  # power on
                assert _vpcd_message(connection, b"\x04")[:1] == b"\x3b"  # ATR
                select = _vpcd_message(connection, bytes.fromhex("00A4040005A00000030800"))
                assert select[-2:] == b"\x90\x00"
        connection, _ = listener.accept()
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        listener.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_driver_survives_a_reset_by_another_application(
        main_card: PivCard, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p11grid.element.piv")
    main_card.login(PIN)
    key = _object(main_card, ObjectClass.PRIVATE_KEY, b"\x02", private=True)
    other = PcscTransport(MAIN_READER, timeout=5.0)
    other.connect()
    other.reset()  # the card forgets the PIV selection and the PIN
    other.disconnect()
    digest = hashlib.sha256(b"after a reset").digest()
    assert len(main_card.sign(key, Mechanism.ECDSA, None, digest)) == 64
    assert "re-establishing the PIV session" in caplog.text  # SELECT and VERIFY again


class AppletTransport:
    """The applet in this process, as an ApduTransport; GET CHALLENGE can be switched off."""

    name = "in-process applet"

    def __init__(self, directory: Path, get_challenge: bool) -> None:
        self.card = PivApplet(CardState.load(directory))
        self.get_challenge = get_challenge

    def connect(self) -> bytes:
        if not self.card.powered:
            self.card.power_on()
        return b"\x3b"

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1] == 0x84 and not self.get_challenge:
            return b"\x6d\x00"
        return self.card.process(apdu)

    def reset(self, warm: bool = True) -> bytes:
        self.card.reset()
        return b"\x3b"

    def disconnect(self) -> None:
        self.card.power_off()


def test_driver_over_any_transport_refuses_random_without_get_challenge(
        local_card: Path) -> None:
    card = PivCard(AppletTransport(local_card, get_challenge=False))
    card.open()
    assert {o.attributes[Attribute.ID] for o in card.public_objects()} == {b"\x01", b"\x02"}
    with pytest.raises(MechanismRefused):
        card.random(16)
    card.login(PIN)
    key = _object(card, ObjectClass.PRIVATE_KEY, b"\x01", private=True)
    assert len(card.sign(key, Mechanism.ECDSA, None, b"\x07" * 48)) == 64  # cut to 32 bytes
    card.close()
    assert len(PivCard(AppletTransport(local_card, get_challenge=True)).random(16)) == 16
