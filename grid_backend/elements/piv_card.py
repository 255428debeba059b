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
- Key generation (`generate_key`, for `p11grid grid keygen`): the card management key (9B,
  AES-192) authenticated, GENERATE ASYMMETRIC KEY PAIR in the slot, a certificate
  self-signed by the new key on the card (CN = the label), PUT DATA into the slot's
  certificate object. The certificate is what makes the slot visible (see above).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID
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
from idm import der

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

# Key generation: the kinds `generate_key` knows, and the card management key.
KEYGEN_KINDS = {"rsa2048": RSA_ALGORITHMS[2048], "ec256": EC_ALGORITHMS["secp256r1"]}
ALG_AES_192 = 0x0A
KEY_MANAGEMENT = 0x9B
MANAGEMENT_KEY_SIZE = 24  # AES-192
SELF_SIGNED_DAYS = 365

SW_SECURITY_STATUS = 0x6982
SW_PIN_BLOCKED = 0x6983
SW_WRONG_DATA = 0x6A80
SW_NOT_FOUND = 0x6A82
SW_NOT_ENOUGH_MEMORY = 0x6A84
SW_WRONG_P1P2 = 0x6A86
SW_REFERENCE_NOT_FOUND = 0x6A88
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


class ManagementKeyRefused(ElementFailure):
    """The card did not accept the management key's answer to its challenge: a wrong key."""

    def __init__(self) -> None:
        super().__init__("the card refused the management key (9B): card answered 6982, "
                         "security status not satisfied (wrong key)")
        self.sw = SW_SECURITY_STATUS


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
        padded = _padded_pin(pin)

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

    # Key generation ----------------------------------------------------------------------

    def generate_key(self, pin: str, label: str, key_id: bytes, kind: str,
                     management_key: bytes | None = None) -> None:
        """Generate a key pair in the slot `key_id` names, inside the card, and write a
        certificate for it self-signed on the card (CN = `label`). Replaces the slot's key.

        Needs the card management key (9B, AES-192) and the PIN. Everything is checked
        before the card changes; a failure after GENERATE leaves the slot's new key without
        a certificate (the old one is deleted, so the slot is not shown) and says so.
        """
        slot = piv_slot(key_id)
        if kind not in KEYGEN_KINDS:
            raise KeyRefused(f"key kind {kind!r} cannot be generated on a PIV card (known: "
                             f"{', '.join(KEYGEN_KINDS)})")
        if management_key is None:
            raise ElementFailure("generating a key on a PIV card needs its management key "
                                 "(9B, AES-192, 24 bytes)")
        if len(management_key) != MANAGEMENT_KEY_SIZE:
            raise ElementFailure(f"a PIV management key is {MANAGEMENT_KEY_SIZE} bytes "
                                 f"(AES-192), not {len(management_key)}")
        administration_key: bytes = management_key
        padded = _padded_pin(pin)
        try:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
        except ValueError as exc:
            raise InputRefused(f"the label cannot be the certificate's CN: {exc}") from None
        algorithm = KEYGEN_KINDS[kind]
        reference = slot.key_reference

        def card_sign(challenge: bytes) -> bytes:
            self._verify(padded)  # directly before: 9C wants it for every signature
            body, sw = self._exchange(
                bytes([0x00, 0x87, algorithm, reference]),
                _tlv(0x7C, _tlv(0x82, b"") + _tlv(0x81, challenge)))
            if sw != SW_OK:
                raise CardStatus(f"GENERAL AUTHENTICATE with the new key in {reference:02X}",
                                 sw)
            response = _parse_tlv(_parse_tlv(body).get(0x7C, b"")).get(0x82)
            if response is None:
                raise ElementFailure("GENERAL AUTHENTICATE answered no response (82)")
            return response

        def run() -> bytes:
            try:
                # The PIN first: a wrong one stops us before the slot's old key is gone.
                self._verify(padded)
                self._authenticate_management(administration_key)
                public_key = self._generate_pair(reference, algorithm)
                try:
                    certificate = self_signed_certificate(
                        _keygen_certificate(subject, slot, public_key), public_key, card_sign)
                    self._put_certificate(slot, certificate.public_bytes(
                        serialization.Encoding.DER))
                except ElementError as exc:
                    self._forget_certificate(slot)
                    raise ElementFailure(f"slot {reference:02X} now holds a new key without "
                                         f"a certificate: {exc}") from exc
            finally:
                self._drop_administration()
            return b""

        with self._lock:
            self._sequence(run)
            log.info("generated a %s key in slot %02X", kind, reference)
            self.labels[reference] = label
            try:
                self._ensure_ready()
                self._read_objects()
            except ElementError as exc:
                # The key is there all the same; the next listing reads the card again.
                log.warning("objects not re-read after key generation: %s", exc)
                self._ready = False
                self._keys, self._public, self._private = {}, [], []

    def _authenticate_management(self, key: bytes) -> None:
        """SP 800-73-4 external authentication of the card management key (9B)."""
        header = bytes([0x00, 0x87, ALG_AES_192, KEY_MANAGEMENT])
        body, sw = self._exchange(header, _tlv(0x7C, _tlv(0x81, b"")))
        if sw in (SW_WRONG_P1P2, SW_REFERENCE_NOT_FOUND):
            raise ElementFailure(f"the card has no AES-192 management key ({sw:04X})")
        if sw != SW_OK:
            raise CardStatus("GENERAL AUTHENTICATE (management key challenge)", sw)
        challenge = _parse_tlv(_parse_tlv(body).get(0x7C, b"")).get(0x81)
        if challenge is None or len(challenge) != 16:
            raise ElementFailure("the card answered no 16-byte management key challenge")
        # One AES block: ECB is what SP 800-73-4's challenge-response means.
        encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        answer = encryptor.update(challenge) + encryptor.finalize()
        _, sw = self._exchange(header, _tlv(0x7C, _tlv(0x82, answer)))
        if sw == SW_SECURITY_STATUS:
            raise ManagementKeyRefused()
        if sw != SW_OK:
            raise CardStatus("GENERAL AUTHENTICATE (management key response)", sw)

    def _generate_pair(self, reference: int, algorithm: int
                       ) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """GENERATE ASYMMETRIC KEY PAIR; the new public key."""
        body, sw = self._exchange(bytes([0x00, 0x47, 0x00, reference]),
                                  _tlv(0xAC, _tlv(0x80, bytes([algorithm]))))
        if sw in (SW_WRONG_P1P2, SW_REFERENCE_NOT_FOUND):
            raise KeyRefused(f"the card has no key slot {reference:02X} to generate in "
                             f"({sw:04X})")
        if sw == SW_WRONG_DATA:
            raise KeyRefused(f"the card does not generate algorithm {algorithm:02X} keys")
        if sw != SW_OK:
            raise CardStatus(f"GENERATE ASYMMETRIC KEY PAIR in {reference:02X}", sw)
        public = _parse_tlv(_parse_tlv(body).get(0x7F49, b""))
        try:
            if algorithm == RSA_ALGORITHMS[2048]:
                numbers = rsa.RSAPublicNumbers(int.from_bytes(public[0x82], "big"),
                                               int.from_bytes(public[0x81], "big"))
                rsa_key = numbers.public_key()
                if rsa_key.key_size != 2048:
                    raise ValueError(f"a {rsa_key.key_size}-bit modulus")
                return rsa_key
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public[0x86])
        except (KeyError, ValueError) as exc:
            raise ElementFailure(f"the card answered an unusable public key ({exc})") from None

    def _put_certificate_object(self, slot: PivSlot, container: bytes) -> None:
        tag = slot.certificate_tag
        data = _tlv(0x5C, tag.to_bytes((tag.bit_length() + 7) // 8, "big")) \
            + _tlv(0x53, container)
        _, sw = self._exchange(bytes([0x00, 0xDB, 0x3F, 0xFF]), data)
        if sw == SW_NOT_ENOUGH_MEMORY:
            raise ElementFailure(f"the card has no room for the certificate of slot "
                                 f"{slot.key_reference:02X}")
        if sw != SW_OK:
            raise CardStatus(f"PUT DATA {tag:X}", sw)

    def _put_certificate(self, slot: PivSlot, der: bytes) -> None:
        # 71 00: not compressed; FE: the error detection code, empty.
        self._put_certificate_object(
            slot, _tlv(0x70, der) + _tlv(0x71, b"\x00") + _tlv(0xFE, b""))

    def _forget_certificate(self, slot: PivSlot) -> None:
        """Best effort: empty the slot's certificate object, which no longer matches its
        key (an empty object deletes it)."""
        try:
            self._put_certificate_object(slot, b"")
        except ElementError as exc:
            log.warning("slot %02X: the old certificate stays, not matching the new key (%s)",
                        slot.key_reference, exc)

    def _drop_administration(self) -> None:
        """SELECT again: the card forgets the management key's authentication (and the PIN
        VERIFY of generate_key); the PIN of a login is verified again."""
        self._ready = False
        try:
            self._ensure_ready()
        except ElementError as exc:
            log.info("re-selecting the PIV application after key generation: %s", exc)


def _padded_pin(pin: str) -> bytes:
    """The PIN as VERIFY sends it: 6 to 8 digits, padded with FF to 8 bytes."""
    encoded = pin.encode()
    if not (6 <= len(encoded) <= 8 and encoded.isdigit()):
        raise PinInvalid("a PIV PIN is 6 to 8 digits")
    return encoded.ljust(8, b"\xff")


def piv_slot(key_id: bytes) -> PivSlot:
    """The slot a CKA_ID names: OpenSC's (01 -> 9A, 02 -> 9C, 03 -> 9D, 04 -> 9E) or the
    key reference itself (9A, 9C, 9D, 9E); KeyRefused for anything else."""
    for slot in SLOTS:
        if key_id in (slot.object_id, bytes([slot.key_reference])):
            return slot
    known = ", ".join(f"{s.object_id.hex()} or {s.key_reference:02x}" for s in SLOTS)
    raise KeyRefused(f"id {key_id.hex() or '(empty)'} names no PIV key slot (known: {known})")


def self_signed_certificate(builder: x509.CertificateBuilder,
                            public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
                            card_sign: Callable[[bytes], bytes]) -> x509.Certificate:
    """`builder`'s certificate (its public key `public_key`), signed with SHA-256 by the
    card's private half of that key, and verified with `public_key`.

    `card_sign` is the card's private-key operation (GENERAL AUTHENTICATE): handed the
    EMSA-PKCS1-v1_5 block of the TBS's SHA-256 it answers raw RSA; handed the hash itself,
    a DER ECDSA signature. ElementFailure when the result does not verify.
    """
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    # cryptography signs only with keys it holds: a throwaway key of the same type signs a
    # draft, which fixes the TBS (its signature algorithm included); the card signs that.
    stand_in: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if rsa_key:
        stand_in = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        stand_in = ec.generate_private_key(ec.SECP256R1())
    tbs = builder.sign(stand_in, hashes.SHA256()).tbs_certificate_bytes
    digest = hashlib.sha256(tbs).digest()
    if isinstance(public_key, rsa.RSAPublicKey):
        size = public_key.key_size // 8
        info = der.SHA256_DIGEST_INFO + digest
        block = b"\x00\x01" + b"\xff" * (size - 3 - len(info)) + b"\x00" + info
        signature = card_sign(block).rjust(size, b"\x00")
        algorithm = der.SHA256_WITH_RSA
    else:
        # The card wants a hash of the curve's size; a shorter one is the same number.
        signature = card_sign(digest.rjust((public_key.curve.key_size + 7) // 8, b"\x00"))
        algorithm = der.ECDSA_WITH_SHA256
    try:
        certificate = x509.load_der_x509_certificate(der.signed(tbs, algorithm, signature))
        if certificate.public_key() != public_key:
            raise ValueError("the certificate holds another public key")
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(certificate.signature, certificate.tbs_certificate_bytes,
                              padding.PKCS1v15(), hashes.SHA256())
        else:
            public_key.verify(certificate.signature, certificate.tbs_certificate_bytes,
                              ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature) as exc:
        raise ElementFailure("the card's signature on the new certificate does not verify "
                             f"with the generated key ({exc or 'bad signature'})") from exc
    return certificate


def _keygen_certificate(subject: x509.Name, slot: PivSlot,
                        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                        ) -> x509.CertificateBuilder:
    """The self-signed certificate that carries a generated key's public half."""
    now = datetime.datetime.now(datetime.UTC)
    rsa_key = isinstance(public_key, rsa.RSAPublicKey)
    # Usage as the driver offers the key: 9C signs only; other RSA keys also decrypt,
    # other EC keys also agree keys (the card does ECDH).
    sign_only = slot.key_reference in SIGN_ONLY
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=rsa_key and not sign_only, data_encipherment=False,
            key_agreement=not rsa_key and not sign_only, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


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
