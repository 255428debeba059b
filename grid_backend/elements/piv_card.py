"""A secure element that is a PIV card (NIST SP 800-73-4), spoken to in APDUs.

Works over any ApduTransport (PC/SC, RACS). What it shows:
- Per populated key slot (a certificate in the slot's data object): a CKO_CERTIFICATE and
  a CKO_PUBLIC_KEY taken from it, public; a CKO_PRIVATE_KEY, after login. A PIV card has
  no way to list its keys: a slot without a certificate is not shown.
- CKA_ID is OpenSC's scheme, one byte per slot: 9A -> 01, 9C -> 02, 9D -> 03, 9E -> 04,
  shared by the slot's certificate, public key and private key, so objects found through
  OpenSC and through p11grid carry the same ids. CKA_LABEL is the constructor's label for
  the slot (all three objects), OpenSC's key label by default.
- Mechanisms: CKM_RSA_X_509 (GENERAL AUTHENTICATE is a raw RSA private-key operation, for
  signing and decrypting alike) and CKM_ECDSA (the card signs a hash of the curve's size;
  its DER signature is turned into PKCS#11's r || s). Everything else is composed in the
  module. CKA_DECRYPT is true for RSA keys outside slot 9C, which PIV reserves for signing.
- The PIN is kept in memory between login and logout: slot 9C needs a VERIFY before every
  signature (PIV's "PIN always" policy), and a card reset by another application (or a
  reconnect after a transport failure) forgets the verification. CKA_ALWAYS_AUTHENTICATE is
  therefore false: the driver does the per-signature VERIFY itself.
- One lock around each APDU sequence: a card runs one command at a time, and VERIFY must
  directly precede a 9C signature.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pkcs11.constants import Attribute, CertificateType, ObjectClass
from pkcs11.mechanisms import KeyType, Mechanism

from grid_backend.apdu import SW_OK, ApduTransport, TransportFailure
from grid_backend.endpoints import parse_endpoint
from grid_backend.secure_element import (
    ElementAbsent,
    ElementError,
    ElementFailure,
    ElementInfo,
    ElementObject,
    InputRefused,
    KeyRefused,
    MechanismParameters,
    MechanismRefused,
    NotLoggedIn,
    PinIncorrect,
    PinInvalid,
    PinLocked,
)

log = logging.getLogger("p11grid.element.piv")

PIV_AID = bytes.fromhex("A000000308000010000100")
TAG_CHUID = 0x5FC102


@dataclass(frozen=True, slots=True)
class PivSlot:
    key_reference: int
    certificate_tag: int
    object_id: bytes
    default_label: str


SLOTS: tuple[PivSlot, ...] = (
    PivSlot(0x9A, 0x5FC105, b"\x01", "PIV AUTH key"),
    PivSlot(0x9C, 0x5FC10A, b"\x02", "SIGN key"),
    PivSlot(0x9D, 0x5FC10B, b"\x03", "KEY MAN key"),
    PivSlot(0x9E, 0x5FC101, b"\x04", "CARD AUTH key"),
)
PIN_ALWAYS = frozenset({0x9C})
NO_PIN = frozenset({0x9E})  # card authentication works without the PIN
SIGN_ONLY = frozenset({0x9C})

# PIV algorithm identifiers (SP 800-78-4 table 6-2; 4096 as YubiKey 5.7 numbers it).
RSA_ALGORITHMS = {1024: 0x06, 2048: 0x07, 3072: 0x05, 4096: 0x16}
EC_ALGORITHMS = {"secp256r1": 0x11, "secp384r1": 0x14}
EC_OIDS = {"secp256r1": bytes.fromhex("06082a8648ce3d030107"),
           "secp384r1": bytes.fromhex("06052b81040022")}

SW_SECURITY_STATUS = 0x6982
SW_PIN_BLOCKED = 0x6983
SW_NOT_FOUND = 0x6A82
SW_INS_NOT_SUPPORTED = 0x6D00
SHORT_CHUNK = 255

_ULONG = struct.Struct("L")  # CK_ULONG in native byte order
TRUE, FALSE = b"\x01", b"\x00"


def _ulong(value: int) -> bytes:
    return _ULONG.pack(int(value))


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    size = (length.bit_length() + 7) // 8
    return bytes([0x80 | size]) + length.to_bytes(size, "big")


def _tlv(tag: int, value: bytes) -> bytes:
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big") + _der_length(len(value)) \
        + value


def _parse_tlv(data: bytes) -> dict[int, bytes]:
    """One level of BER-TLV by tag (first of each wins); ElementFailure when malformed."""
    found: dict[int, bytes] = {}
    i = 0
    try:
        while i < len(data):
            tag = data[i]
            i += 1
            if tag & 0x1F == 0x1F:
                while True:
                    tag = (tag << 8) | data[i]
                    i += 1
                    if not data[i - 1] & 0x80:
                        break
            length = data[i]
            i += 1
            if length & 0x80:
                size = length & 0x7F
                length = int.from_bytes(data[i:i + size], "big")
                i += size
            if i + length > len(data):
                raise IndexError
            found.setdefault(tag, data[i:i + length])
            i += length
    except IndexError:
        raise ElementFailure("the card answered a malformed TLV") from None
    return found


class CardStatus(ElementFailure):
    """The card answered a status word the driver has no better meaning for."""

    def __init__(self, what: str, sw: int) -> None:
        super().__init__(f"{what}: card answered {sw:04X}")
        self.sw = sw


@dataclass(frozen=True, slots=True)
class _SlotKey:
    """A populated slot: its certificate and the public key in it."""

    slot: PivSlot
    certificate: x509.Certificate
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey

    @property
    def algorithm(self) -> int:
        if isinstance(self.public_key, rsa.RSAPublicKey):
            return RSA_ALGORITHMS[self.public_key.key_size]
        return EC_ALGORITHMS[self.public_key.curve.name]


class PivCard:
    """The PIV application of the card behind `transport`."""

    def __init__(self, transport: ApduTransport, labels: dict[int, str] | None = None) -> None:
        self.transport = transport
        self.labels = dict(labels or {})
        self._lock = threading.RLock()
        self._ready = False  # connected, PIV selected, PIN re-verified if we hold it
        self._pin: bytes | None = None  # 8-byte padded form, between login and logout
        self._keys: dict[int, _SlotKey] = {}
        self._serial = ""
        self._public: list[ElementObject] = []
        self._private: list[ElementObject] = []
        self._random_supported = True

    # Exchanges --------------------------------------------------------------------------

    def _exchange(self, header: bytes, data: bytes = b"",
                  le: int | None = 0) -> tuple[bytes, int]:
        """One command, chained in short APDUs, with its whole response and status word.

        `le` is the Le byte of the last APDU (0 asks for up to 256 bytes); None sends none.
        """
        transport = self.transport
        try:
            chunks = [data[i:i + SHORT_CHUNK] for i in range(0, len(data), SHORT_CHUNK)] \
                or [b""]
            for index, chunk in enumerate(chunks):
                last = index == len(chunks) - 1
                apdu = bytes([header[0] | (0x00 if last else 0x10)]) + header[1:4]
                if chunk:
                    apdu += bytes([len(chunk)]) + chunk
                if last and le is not None:
                    apdu += bytes([le])
                response = transport.transmit(apdu)
                if len(response) < 2:
                    raise TransportFailure(f"response of {len(response)} bytes")
                if not last and response[-2:] != b"\x90\x00":
                    break
            body = response[:-2]
            sw = int.from_bytes(response[-2:], "big")
            while True:
                if sw >> 8 == 0x61:  # more data: GET RESPONSE
                    response = transport.transmit(bytes([0x00, 0xC0, 0x00, 0x00, sw & 0xFF]))
                elif sw >> 8 == 0x6C:  # wrong Le: the card says which
                    response = transport.transmit(apdu[:-1] + bytes([sw & 0xFF]))
                    body = b""
                else:
                    return body, sw
                if len(response) < 2:
                    raise TransportFailure(f"response of {len(response)} bytes")
                body += response[:-2]
                sw = int.from_bytes(response[-2:], "big")
        except ElementError:
            self._ready = False  # the card's session state is unknown now
            raise

    def _select(self) -> None:
        _, sw = self._exchange(bytes([0x00, 0xA4, 0x04, 0x00]), PIV_AID)
        if sw == SW_NOT_FOUND:
            raise ElementAbsent(f"{self.transport.name}: the card has no PIV application")
        if sw != SW_OK:
            raise CardStatus("SELECT PIV", sw)

    def _verify(self, pin: bytes) -> None:
        _, sw = self._exchange(bytes([0x00, 0x20, 0x00, 0x80]), pin, le=None)
        if sw == SW_OK:
            return
        if sw & 0xFFF0 == 0x63C0:
            tries = sw & 0x0F
            if tries == 0:
                raise PinLocked("the PIN is blocked")
            raise PinIncorrect(f"wrong PIN, {tries} tries left")
        if sw == SW_PIN_BLOCKED:
            raise PinLocked("the PIN is blocked")
        if sw == 0x6A80:
            raise PinInvalid("the card refused the PIN's format")
        raise CardStatus("VERIFY", sw)

    def _ensure_ready(self) -> None:
        """Connected, the PIV application selected, and the PIN verified if we hold it."""
        if self._ready:
            return
        self.transport.connect()
        self._select()
        if self._pin is not None:
            self._verify(self._pin)
        self._ready = True

    def _sequence(self, run: Callable[[], bytes]) -> bytes:
        """Run an APDU sequence on a ready card; once more if a reset kept the APDU back."""
        with self._lock:
            for attempt in (1, 2):
                self._ensure_ready()
                try:
                    return run()
                except TransportFailure as exc:
                    if attempt == 2 or getattr(exc, "apdu_sent", True):
                        raise
                    log.info("%s; re-establishing the PIV session", exc)
            raise AssertionError("unreachable")

    # Open, close, objects --------------------------------------------------------------

    def open(self) -> None:
        with self._lock:
            if self._ready and self._public:
                return
            self._ensure_ready()
            self._read_objects()

    def close(self) -> None:
        with self._lock:
            self._ready = False
            self._pin = None
            self.transport.disconnect()

    def _get_data(self, tag: int) -> bytes | None:
        tag_bytes = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
        body, sw = self._exchange(bytes([0x00, 0xCB, 0x3F, 0xFF]), _tlv(0x5C, tag_bytes))
        if sw == SW_NOT_FOUND:
            return None
        if sw != SW_OK:
            raise CardStatus(f"GET DATA {tag:X}", sw)
        return _parse_tlv(body).get(0x53)

    def _read_objects(self) -> None:
        chuid = self._get_data(TAG_CHUID)
        guid = _parse_tlv(chuid).get(0x34, b"") if chuid else b""
        self._serial = guid.hex()[:16] if guid else self.transport.name
        keys: dict[int, _SlotKey] = {}
        for slot in SLOTS:
            container = self._get_data(slot.certificate_tag)
            if not container:
                continue
            parts = _parse_tlv(container)
            if parts.get(0x71, b"\x00")[:1] not in (b"\x00", b""):
                log.warning("slot %02X: compressed certificate not supported; skipped",
                            slot.key_reference)
                continue
            try:
                certificate = x509.load_der_x509_certificate(parts.get(0x70, b""))
                public_key = certificate.public_key()
            except ValueError as exc:
                log.warning("slot %02X: unreadable certificate (%s); skipped",
                            slot.key_reference, exc)
                continue
            if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) or (
                    isinstance(public_key, ec.EllipticCurvePublicKey)
                    and public_key.curve.name not in EC_ALGORITHMS) or (
                    isinstance(public_key, rsa.RSAPublicKey)
                    and public_key.key_size not in RSA_ALGORITHMS):
                log.warning("slot %02X: key type not supported; skipped", slot.key_reference)
                continue
            keys[slot.key_reference] = _SlotKey(slot, certificate, public_key)
        self._keys = keys
        self._public, self._private = [], []
        for key in keys.values():
            self._public += self._public_objects(key)
            self._private.append(self._private_object(key))

    def _label(self, slot: PivSlot) -> bytes:
        return self.labels.get(slot.key_reference, slot.default_label).encode()

    @staticmethod
    def _key_attributes(key: _SlotKey) -> dict[int, bytes]:
        public_key = key.public_key
        if isinstance(public_key, rsa.RSAPublicKey):
            numbers = public_key.public_numbers()
            return {
                Attribute.KEY_TYPE: _ulong(KeyType.RSA),
                Attribute.MODULUS: numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"),
                Attribute.PUBLIC_EXPONENT: numbers.e.to_bytes(
                    (numbers.e.bit_length() + 7) // 8, "big"),
                Attribute.MODULUS_BITS: _ulong(public_key.key_size),
            }
        point = public_key.public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
        return {
            Attribute.KEY_TYPE: _ulong(KeyType.EC),
            Attribute.EC_PARAMS: EC_OIDS[public_key.curve.name],
            Attribute.EC_POINT: _tlv(0x04, point),  # PKCS#11 wants a DER OCTET STRING
        }

    def _public_objects(self, key: _SlotKey) -> list[ElementObject]:
        slot, certificate = key.slot, key.certificate
        common = {Attribute.TOKEN: TRUE, Attribute.PRIVATE: FALSE,
                  Attribute.ID: slot.object_id, Attribute.LABEL: self._label(slot),
                  Attribute.MODIFIABLE: FALSE}
        subject = certificate.subject.public_bytes()
        rsa_key = isinstance(key.public_key, rsa.RSAPublicKey)
        certificate_object = ElementObject(ref=("certificate", slot.key_reference), attributes={
            Attribute.CLASS: _ulong(ObjectClass.CERTIFICATE), **common,
            Attribute.CERTIFICATE_TYPE: _ulong(CertificateType.X_509),
            Attribute.VALUE: certificate.public_bytes(serialization.Encoding.DER),
            Attribute.SUBJECT: subject,
            Attribute.ISSUER: certificate.issuer.public_bytes(),
            # CKA_SERIAL_NUMBER is the DER INTEGER, tag and length included.
            Attribute.SERIAL_NUMBER: _tlv(0x02, _der_integer(certificate.serial_number)),
            Attribute.TRUSTED: FALSE,
        })
        public_object = ElementObject(ref=("public", slot.key_reference), attributes={
            Attribute.CLASS: _ulong(ObjectClass.PUBLIC_KEY), **common,
            **self._key_attributes(key),
            Attribute.SUBJECT: subject,
            Attribute.VERIFY: TRUE,
            Attribute.ENCRYPT: TRUE if rsa_key else FALSE,
            Attribute.WRAP: FALSE, Attribute.VERIFY_RECOVER: FALSE, Attribute.DERIVE: FALSE,
        })
        return [certificate_object, public_object]

    def _private_object(self, key: _SlotKey) -> ElementObject:
        slot = key.slot
        rsa_key = isinstance(key.public_key, rsa.RSAPublicKey)
        return ElementObject(ref=("private", slot.key_reference), attributes={
            Attribute.CLASS: _ulong(ObjectClass.PRIVATE_KEY),
            Attribute.TOKEN: TRUE, Attribute.PRIVATE: TRUE, Attribute.MODIFIABLE: FALSE,
            Attribute.ID: slot.object_id, Attribute.LABEL: self._label(slot),
            **{a: v for a, v in self._key_attributes(key).items()
               if a != Attribute.EC_POINT},
            Attribute.SUBJECT: key.certificate.subject.public_bytes(),
            Attribute.SENSITIVE: TRUE, Attribute.EXTRACTABLE: FALSE,
            # A PIV card has no key export: its keys were always sensitive, never extractable.
            Attribute.ALWAYS_SENSITIVE: TRUE, Attribute.NEVER_EXTRACTABLE: TRUE,
            Attribute.SIGN: TRUE,
            Attribute.DECRYPT: TRUE if rsa_key and slot.key_reference not in SIGN_ONLY
            else FALSE,
            Attribute.SIGN_RECOVER: FALSE, Attribute.UNWRAP: FALSE, Attribute.DERIVE: FALSE,
            Attribute.ALWAYS_AUTHENTICATE: FALSE,
        })

    def info(self) -> ElementInfo:
        return ElementInfo(manufacturer="PIV", model="PIV card", serial=self._serial,
                           min_pin_length=6, max_pin_length=8)

    def mechanisms(self) -> frozenset[int]:
        return frozenset({int(Mechanism.RSA_X_509), int(Mechanism.ECDSA)})

    def public_objects(self) -> list[ElementObject]:
        with self._lock:
            if not self._ready and not self._public:
                self.open()
            return list(self._public)

    def private_objects(self) -> list[ElementObject]:
        with self._lock:
            if self._pin is None:
                raise NotLoggedIn("log in before listing private objects")
            return list(self._private)

    # Login -------------------------------------------------------------------------------

    def login(self, pin: str) -> None:
        encoded = pin.encode()
        if not (6 <= len(encoded) <= 8 and encoded.isdigit()):
            raise PinInvalid("a PIV PIN is 6 to 8 digits")
        padded = encoded.ljust(8, b"\xff")

        def run() -> bytes:
            self._verify(padded)
            return b""

        with self._lock:
            self._pin = None
            # Through _sequence: a card reset by another application (a RACS session
            # ending on a shared reader) is selected again and the VERIFY sent once more.
            self._sequence(run)
            self._pin = padded

    def logout(self) -> None:
        with self._lock:
            self._pin = None
            if self._ready:
                try:
                    # P1 FF: the card forgets the PIN's verification.
                    _, sw = self._exchange(bytes([0x00, 0x20, 0xFF, 0x80]), le=None)
                except TransportFailure as exc:
                    # Not ready any more; a reset or reconnect forgets the PIN anyway.
                    log.info("logout: %s", exc)
                    return
                if sw != SW_OK:
                    self._ready = False  # a card without it: reselecting forgets it too

    # Operations --------------------------------------------------------------------------

    def _slot_key(self, key: ElementObject) -> _SlotKey:
        ref = key.ref
        if not (isinstance(ref, tuple) and len(ref) == 2 and ref[0] == "private"
                and ref[1] in self._keys):
            raise KeyRefused("not a private key of this PIV card")
        return self._keys[ref[1]]

    def _general_authenticate(self, key: _SlotKey, challenge: bytes) -> bytes:
        reference = key.slot.key_reference
        template = _tlv(0x7C, _tlv(0x82, b"") + _tlv(0x81, challenge))
        header = bytes([0x00, 0x87, key.algorithm, reference])

        def run() -> bytes:
            if self._pin is None and reference not in NO_PIN:
                raise NotLoggedIn("log in before using a private key")
            if reference in PIN_ALWAYS and self._pin is not None:
                self._verify(self._pin)
            body, sw = self._exchange(header, template)
            if sw == SW_SECURITY_STATUS and self._pin is not None:
                # Someone else reset the PIN status (another application, a reselect):
                # verify again and try once more.
                self._verify(self._pin)
                body, sw = self._exchange(header, template)
            if sw == SW_OK:
                response = _parse_tlv(_parse_tlv(body).get(0x7C, b"")).get(0x82)
                if response is None:
                    raise ElementFailure("GENERAL AUTHENTICATE answered no response (82)")
                return response
            if sw == SW_SECURITY_STATUS:
                raise NotLoggedIn("the card wants the PIN verified")
            if sw == 0x6A80:
                raise InputRefused("the card refused the data")
            if sw in (0x6A86, 0x6A88):
                raise KeyRefused(f"the card has no such key ({sw:04X})")
            raise CardStatus("GENERAL AUTHENTICATE", sw)

        return self._sequence(run)

    def _raw_rsa(self, key: _SlotKey, data: bytes) -> bytes:
        public_key = key.public_key
        assert isinstance(public_key, rsa.RSAPublicKey)
        size = public_key.key_size // 8
        # CKM_RSA_X_509 takes shorter input as the same number: pad on the left.
        if len(data) > size:
            raise InputRefused(f"raw RSA input of {len(data)} bytes for a {size}-byte key")
        block = data.rjust(size, b"\x00")
        if int.from_bytes(block, "big") >= public_key.public_numbers().n:
            raise InputRefused("raw RSA input not smaller than the modulus")
        return self._general_authenticate(key, block)

    def sign(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
             data: bytes) -> bytes:
        slot_key = self._slot_key(key)
        if parameters is not None:
            raise MechanismRefused("PIV card mechanisms take no parameters")
        public_key = slot_key.public_key
        if mechanism == Mechanism.RSA_X_509 and isinstance(public_key, rsa.RSAPublicKey):
            return self._raw_rsa(slot_key, data)
        if mechanism == Mechanism.ECDSA and isinstance(public_key, ec.EllipticCurvePublicKey):
            size = (public_key.curve.key_size + 7) // 8
            if not data:
                raise InputRefused("nothing to sign")
            # The card signs a hash exactly the curve's size: a longer one is cut to its
            # leftmost bytes as ECDSA itself would, a shorter one is the same number padded.
            digest = data[:size].rjust(size, b"\x00")
            der = self._general_authenticate(slot_key, digest)
            try:
                r, s = decode_dss_signature(der)
            except ValueError as exc:
                raise ElementFailure("the card's ECDSA signature is not DER") from exc
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        raise MechanismRefused(f"mechanism 0x{mechanism:x} not done by this key")

    def decrypt(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
                data: bytes) -> bytes:
        slot_key = self._slot_key(key)
        if mechanism != Mechanism.RSA_X_509 or parameters is not None:
            raise MechanismRefused(f"mechanism 0x{mechanism:x} not done by this card")
        if not isinstance(slot_key.public_key, rsa.RSAPublicKey) or \
                slot_key.slot.key_reference in SIGN_ONLY:
            raise KeyRefused("this key does not decrypt")
        return self._raw_rsa(slot_key, data)

    def random(self, length: int) -> bytes:
        if length == 0:
            return b""
        if not self._random_supported:
            raise MechanismRefused("the card has no GET CHALLENGE")

        def run() -> bytes:
            collected = b""
            while len(collected) < length:
                wanted = min(256, length - len(collected))
                body, sw = self._exchange(bytes([0x00, 0x84, 0x00, 0x00]), le=wanted & 0xFF)
                if sw in (SW_INS_NOT_SUPPORTED, 0x6E00, 0x6A81):
                    self._random_supported = False
                    raise MechanismRefused("the card has no GET CHALLENGE")
                if sw != SW_OK or not body:
                    raise CardStatus("GET CHALLENGE", sw)
                collected += body[:wanted]
            return collected

        return self._sequence(run)


def _der_integer(value: int) -> bytes:
    """The content octets of a DER INTEGER (two's complement, minimal)."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)



def _label_table(labels: object) -> dict[int, str]:
    """{"9a": "piv-rsa"} (slot in hex, as PIV numbers it) -> {0x9A: "piv-rsa"}."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ElementFailure("PIV settings: labels is a table of slot (hex) -> label")
    table: dict[int, str] = {}
    for slot, label in labels.items():
        try:
            reference = int(str(slot), 16)
        except ValueError:
            raise ElementFailure(f"PIV settings: slot {slot!r} is not hex (9a, 9c, 9d, 9e)"
                                 ) from None
        if reference not in {s.key_reference for s in SLOTS} or not isinstance(label, str):
            raise ElementFailure(f"PIV settings: no key slot {slot!r}, or its label is no "
                                 "string")
        table[reference] = label
    return table


def open_piv_card(settings: dict[str, Any]) -> PivCard:
    """The PIV card a registry record describes (not yet opened). Settings, as JSON:

        {"transport": "pcsc", "reader": "Virtual PCD",    # first reader whose name holds it
         "labels": {"9a": "piv-rsa"},                     # optional: CKA_LABEL per slot
         "timeout": 15, "connect_timeout": 5}             # optional, seconds

        {"transport": "racs", "server": "host:port", "seid": "SE1",   # a card on a RACS
         "certificate": "/abs/client.pem", "key": "/abs/client.key",  # server, reached
         "ca": "/abs/ca.pem", "deadline": 30, "labels": {...}}        # with mutual TLS

    Slots without a label show OpenSC's names ("PIV AUTH key", ...).
    """
    labels = _label_table(settings.get("labels"))
    transport_kind = settings.get("transport", "pcsc")
    transport: ApduTransport
    try:
        if transport_kind == "pcsc":
            from grid_backend.transports.pcsc import PcscTransport

            transport = PcscTransport(str(settings["reader"]),
                                      timeout=float(settings.get("timeout", 15.0)),
                                      connect_timeout=float(settings.get("connect_timeout", 5.0)))
        elif transport_kind == "racs":
            from grid_backend.transports.racs import RacsTransport

            try:
                host, port = parse_endpoint(settings["server"])
            except ValueError as exc:
                raise ElementFailure(f"PIV settings: server {exc}") from None
            transport = RacsTransport(str(settings["seid"]), host, port,
                                      Path(settings["certificate"]), Path(settings["key"]),
                                      Path(settings["ca"]),
                                      deadline=float(settings.get("deadline", 30.0)))
        else:
            raise ElementFailure(f"PIV settings: transport {transport_kind!r} is not pcsc or "
                                 "racs")
    except KeyError as exc:
        raise ElementFailure(f"PIV settings ({transport_kind}): {exc.args[0]} is missing"
                             ) from None
    return PivCard(transport, labels)
