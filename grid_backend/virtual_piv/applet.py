"""The PIV card application (NIST SP 800-73-4 part 2), answering command APDUs.

What it does, and how it departs from a real card:
- The PIV application is the only one on the card and is selected after power-on or
  reset; SELECT by its AID (or a prefix of it of at least 5 bytes, the RID) answers the
  application property template and resets the security status.
- PIN (key reference 80): 6 to 8 digits, padded with FF to 8 bytes. The retry counter is
  decremented and stored *before* the comparison and restored after a match, so cutting
  the power mid-VERIFY does not give a free guess. Global PIN (00) and PUK (81) are not
  offered (6A88).
- Administration (GENERATE ASYMMETRIC KEY PAIR, PUT DATA) needs the card management key
  (key reference 9B, AES-192, algorithm 0A) authenticated by GENERAL AUTHENTICATE in the
  "external authenticate" form: the client asks `7C { 81 00 }`, the card answers a
  16-byte challenge in 81, the client returns it AES-encrypted in `7C { 82 .. }`.
- Private-key slots 9A, 9C, 9D: 9A and 9D need the PIN verified since the last SELECT or
  reset; 9C (digital signature) needs a VERIFY right before each use.
- Keys are generated in the card (RSA-2048 alg 07, ECC P-256 alg 11) and never leave it.
- GENERAL AUTHENTICATE: `7C { 82 00, 81 challenge }` is a raw RSA private-key operation
  (signature and decryption alike) or an ECDSA signature over a hash of the curve's size,
  answered DER-encoded in `7C { 82 .. }`; `7C { 82 00, 85 point }` is ECDH.
- GET CHALLENGE (ISO 7816-4, INS 84) gives random bytes; not in SP 800-73-4, but handy.
- Command chaining (CLA 10) and response chaining (61xx, GET RESPONSE) for short APDUs;
  extended-length APDUs are also understood.
- A key slot without a key answers 6A88 (referenced data not found); a data object that is
  not there answers 6A82 (file not found).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from grid_backend.virtual_piv import tlv
from grid_backend.virtual_piv.state import CardState, SlotKey

log = logging.getLogger("p11grid.virtual_piv")

PIV_AID = bytes.fromhex("A000000308000010000100")
PIX = PIV_AID[5:]  # 00 00 10 00 01 00, as the application property template names it
RID = PIV_AID[:5]
# TS 3B, T0 8A (TD1, 10 historical bytes), TD1 80 (TD2, T=0), TD2 01 (T=1), history, TCK.
_HISTORY = b"p11gridPIV"
_ATR_BODY = bytes([0x8A, 0x80, 0x01]) + _HISTORY
def _tck(body: bytes) -> int:
    value = 0
    for byte in body:
        value ^= byte
    return value


ATR = b"\x3b" + _ATR_BODY + bytes([_tck(_ATR_BODY)])

ALG_RSA_2048 = 0x07
ALG_ECC_P256 = 0x11
ALG_AES_192 = 0x0A
KEY_PIN = 0x80
KEY_MANAGEMENT = 0x9B
KEY_SLOTS = (0x9A, 0x9C, 0x9D)
PIN_ALWAYS_SLOTS = frozenset({0x9C})

TAG_DISCOVERY = 0x7E
TAG_CHUID = 0x5FC102
TAG_CCC = 0x5FC107
CERTIFICATE_TAGS = {0x9A: 0x5FC105, 0x9C: 0x5FC10A, 0x9D: 0x5FC10B}

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_SECURITY_STATUS = 0x6982
SW_PIN_BLOCKED = 0x6983
SW_CONDITIONS = 0x6985
SW_WRONG_DATA = 0x6A80
SW_FUNCTION_NOT_SUPPORTED = 0x6A81
SW_NOT_FOUND = 0x6A82
SW_NOT_ENOUGH_MEMORY = 0x6A84
SW_WRONG_P1P2 = 0x6A86
SW_REFERENCE_NOT_FOUND = 0x6A88
SW_LAST_OF_CHAIN_EXPECTED = 0x6883
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_NO_PRECISE_DIAGNOSIS = 0x6F00

MAX_OBJECT_SIZE = 3 * 1024 + 512  # room for a certificate the size real cards accept


class CardStatus(Exception):
    """Ends a command with this status word."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


@dataclass(frozen=True, slots=True)
class Command:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    ne: int  # bytes the client accepts in one response
    extended: bool


def parse_command(apdu: bytes) -> Command:
    """Cases 1 to 4, short and extended (ISO 7816-3 12.1)."""
    if len(apdu) < 4:
        raise CardStatus(SW_WRONG_LENGTH)
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    if not body:
        return Command(cla, ins, p1, p2, b"", 256, False)
    if len(body) == 1:
        return Command(cla, ins, p1, p2, b"", body[0] or 256, False)
    if body[0] != 0:
        lc = body[0]
        if len(body) == 1 + lc:
            return Command(cla, ins, p1, p2, body[1:], 256, False)
        if len(body) == 2 + lc:
            return Command(cla, ins, p1, p2, body[1:1 + lc], body[-1] or 256, False)
        raise CardStatus(SW_WRONG_LENGTH)
    if len(body) == 3:
        return Command(cla, ins, p1, p2, b"", int.from_bytes(body[1:3], "big") or 65536, True)
    lc = int.from_bytes(body[1:3], "big")
    if lc and len(body) == 3 + lc:
        return Command(cla, ins, p1, p2, body[3:], 65536, True)
    if lc and len(body) == 5 + lc:
        return Command(cla, ins, p1, p2, body[3:3 + lc],
                       int.from_bytes(body[-2:], "big") or 65536, True)
    raise CardStatus(SW_WRONG_LENGTH)


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


class PivApplet:
    """One PIV card. Not thread-safe: a card runs one command at a time."""

    def __init__(self, state: CardState) -> None:
        self.state = state
        self._private_keys: dict[int, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {}
        for slot, key in state.keys.items():
            self._private_keys[slot] = self._load_key(key)
        self._pin_verified = False
        self._pin_for_signature = False  # the next 9C use; consumed by it
        self._admin = False
        self._management_challenge: bytes | None = None
        self._chain: tuple[int, int, int, bytes] | None = None  # INS, P1, P2, data so far
        self._pending = b""  # response bytes waiting for GET RESPONSE
        self.powered = False

    @staticmethod
    def _load_key(key: SlotKey) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
        loaded = serialization.load_pem_private_key(key.private_pem, password=None)
        assert isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        return loaded

    # Power and reset -------------------------------------------------------------------

    def _clear_session(self) -> None:
        self._pin_verified = False
        self._pin_for_signature = False
        self._admin = False
        self._management_challenge = None
        self._chain = None
        self._pending = b""

    def power_on(self) -> None:
        self.powered = True
        self._clear_session()

    def power_off(self) -> None:
        self.powered = False
        self._clear_session()

    def reset(self) -> None:
        self.power_on()

    # APDUs ----------------------------------------------------------------------------

    def process(self, apdu: bytes) -> bytes:
        """One command APDU in, its response APDU (data + SW1 SW2) out."""
        try:
            command = parse_command(apdu)
        except CardStatus as status:
            return _sw(status.sw)
        pending, self._pending = self._pending, b""
        if command.ins == 0xC0 and command.cla & 0xEF == 0x00:
            if not pending:
                return _sw(SW_CONDITIONS)
            return self._respond(pending, command)
        try:
            if command.cla not in (0x00, 0x10):
                raise CardStatus(SW_CLA_NOT_SUPPORTED)
            command = self._unchain(command)
            if command is None:
                return _sw(SW_OK)
            data = self._dispatch(command)
        except CardStatus as status:
            return _sw(status.sw)
        except Exception:  # a card answers; it never dies on a command
            log.exception("command %02X failed", command.ins)
            return _sw(SW_NO_PRECISE_DIAGNOSIS)
        return self._respond(data, command)

    def _respond(self, data: bytes, command: Command) -> bytes:
        size = command.ne if command.extended else min(command.ne, 256)
        if len(data) <= size:
            return data + _sw(SW_OK)
        self._pending = data[size:]
        remaining = len(self._pending)
        return data[:size] + bytes([0x61, remaining if remaining < 256 else 0])

    def _unchain(self, command: Command) -> Command | None:
        """Collect a command chain; the full command when its last part arrives."""
        chain = self._chain
        if command.ins == 0xA4:  # a SELECT starts over, whatever was left half-sent
            chain = self._chain = None
        if chain is not None and chain[:3] != (command.ins, command.p1, command.p2):
            self._chain = None
            raise CardStatus(SW_LAST_OF_CHAIN_EXPECTED)
        collected = (chain[3] if chain else b"") + command.data
        if len(collected) > MAX_OBJECT_SIZE + 64:
            self._chain = None
            raise CardStatus(SW_NOT_ENOUGH_MEMORY)
        if command.cla & 0x10:
            self._chain = (command.ins, command.p1, command.p2, collected)
            return None
        self._chain = None
        return Command(0x00, command.ins, command.p1, command.p2, collected, command.ne,
                       command.extended)

    def _dispatch(self, command: Command) -> bytes:
        handler = {
            0xA4: self._select,
            0x20: self._verify,
            0x24: self._change_reference_data,
            0x47: self._generate,
            0x87: self._general_authenticate,
            0xCB: self._get_data,
            0xDB: self._put_data,
            0x84: self._get_challenge,
        }.get(command.ins)
        if handler is None:
            raise CardStatus(SW_INS_NOT_SUPPORTED)
        return handler(command)

    # SELECT ---------------------------------------------------------------------------

    def _select(self, command: Command) -> bytes:
        if command.p1 != 0x04 or command.p2 not in (0x00, 0x0C):
            raise CardStatus(SW_WRONG_P1P2)
        aid = command.data
        if len(aid) < len(RID) or not PIV_AID.startswith(aid):
            raise CardStatus(SW_NOT_FOUND)
        self._clear_session()
        if command.p2 == 0x0C:  # no response data wanted
            return b""
        algorithms_supported = b"".join(
            tlv.tlv(0x80, bytes([alg])) for alg in (ALG_RSA_2048, ALG_ECC_P256, ALG_AES_192))
        return tlv.tlv(0x61, tlv.tlv(0x4F, PIX)
                       + tlv.tlv(0x79, tlv.tlv(0x4F, RID))
                       + tlv.tlv(0x50, b"p11grid virtual PIV")
                       + tlv.tlv(0xAC, algorithms_supported + tlv.tlv(0x06, b"")))

    # PIN ------------------------------------------------------------------------------

    def _pin_status(self) -> int:
        left = self.state.pin_retries_left
        return SW_PIN_BLOCKED if left == 0 else 0x63C0 | min(left, 15)

    @staticmethod
    def _pin_format(data: bytes) -> bytes:
        """The PIN's digits from its 8-byte FF-padded form, or 6A80."""
        if len(data) != 8:
            raise CardStatus(SW_WRONG_DATA)
        pin = data.rstrip(b"\xff")
        if not 6 <= len(pin) <= 8 or not pin.isdigit():
            raise CardStatus(SW_WRONG_DATA)
        return pin

    def _check_pin(self, pin: bytes) -> None:
        state = self.state
        if state.pin_retries_left == 0:
            raise CardStatus(SW_PIN_BLOCKED)
        state.pin_retries_left -= 1
        state.save()
        if not state.pin_matches(pin):
            self._pin_verified = self._pin_for_signature = False
            raise CardStatus(self._pin_status() if state.pin_retries_left else 0x63C0)
        state.pin_retries_left = state.pin_max_retries
        state.save()

    def _verify(self, command: Command) -> bytes:
        if command.p2 != KEY_PIN:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        if command.p1 == 0xFF:  # reset the PIN's security status
            if command.data:
                raise CardStatus(SW_WRONG_DATA)
            self._pin_verified = self._pin_for_signature = False
            return b""
        if command.p1 != 0x00:
            raise CardStatus(SW_WRONG_P1P2)
        if not command.data:  # status query: verified, or the tries left
            if self._pin_verified:
                return b""
            raise CardStatus(self._pin_status())
        pin = self._pin_format(command.data)
        self._check_pin(pin)
        self._pin_verified = self._pin_for_signature = True
        return b""

    def _change_reference_data(self, command: Command) -> bytes:
        if command.p1 != 0x00:
            raise CardStatus(SW_WRONG_P1P2)
        if command.p2 != KEY_PIN:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        if len(command.data) != 16:
            raise CardStatus(SW_WRONG_DATA)
        old = self._pin_format(command.data[:8])
        new = self._pin_format(command.data[8:])
        self._check_pin(old)
        self.state.set_pin(new)
        self.state.save()
        self._pin_verified = self._pin_for_signature = True
        return b""

    # Administration -------------------------------------------------------------------

    def _management_cipher(self) -> Cipher[modes.ECB]:
        # One AES block: ECB is how SP 800-73-4 challenge-response uses the key.
        return Cipher(algorithms.AES(self.state.management_key), modes.ECB())

    def _authenticate_management(self, command: Command, template: dict[int, bytes]) -> bytes:
        if command.p1 != ALG_AES_192:
            raise CardStatus(SW_WRONG_P1P2)
        if 0x81 in template and not template[0x81]:  # client asks for a challenge
            challenge = secrets.token_bytes(16)
            self._management_challenge = challenge
            self._admin = False
            return tlv.tlv(0x7C, tlv.tlv(0x81, challenge))
        if template.get(0x82):  # client answers the challenge
            challenge, self._management_challenge = self._management_challenge, None
            if challenge is None:
                raise CardStatus(SW_CONDITIONS)
            encryptor = self._management_cipher().encryptor()
            expected = encryptor.update(challenge) + encryptor.finalize()
            if not secrets.compare_digest(expected, template[0x82]):
                self._admin = False
                raise CardStatus(SW_SECURITY_STATUS)
            self._admin = True
            return b""
        raise CardStatus(SW_WRONG_DATA)

    def _generate(self, command: Command) -> bytes:
        if command.p1 != 0x00 or command.p2 not in KEY_SLOTS:
            raise CardStatus(SW_WRONG_P1P2)
        if not self._admin:
            raise CardStatus(SW_SECURITY_STATUS)
        try:
            control = tlv.parse_map(tlv.parse_map(command.data)[0xAC])
            algorithm = control[0x80]
        except (ValueError, KeyError) as exc:
            raise CardStatus(SW_WRONG_DATA) from exc
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if algorithm == bytes([ALG_RSA_2048]):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            numbers = key.public_key().public_numbers()
            public = tlv.tlv(0x81, numbers.n.to_bytes(256, "big")) \
                + tlv.tlv(0x82, numbers.e.to_bytes(3, "big"))
        elif algorithm == bytes([ALG_ECC_P256]):
            key = ec.generate_private_key(ec.SECP256R1())
            public = tlv.tlv(0x86, key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
        else:
            raise CardStatus(SW_WRONG_DATA)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        self.state.keys[command.p2] = SlotKey(algorithm[0], pem)
        self.state.save()
        self._private_keys[command.p2] = key
        return tlv.tlv(0x7F49, public)

    # GENERAL AUTHENTICATE -------------------------------------------------------------

    def _general_authenticate(self, command: Command) -> bytes:
        try:
            outer = tlv.parse_map(command.data)
            template = tlv.parse_map(outer[0x7C])
        except (ValueError, KeyError) as exc:
            raise CardStatus(SW_WRONG_DATA) from exc
        if command.p2 == KEY_MANAGEMENT:
            return self._authenticate_management(command, template)
        if command.p2 not in KEY_SLOTS:
            raise CardStatus(SW_WRONG_P1P2)
        slot_key = self.state.keys.get(command.p2)
        if slot_key is None:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        if command.p1 != slot_key.algorithm:
            raise CardStatus(SW_WRONG_P1P2)
        if 0x82 not in template or template[0x82]:
            raise CardStatus(SW_WRONG_DATA)  # the response must be asked for with 82 00
        if command.p2 in PIN_ALWAYS_SLOTS:
            if not self._pin_for_signature:
                raise CardStatus(SW_SECURITY_STATUS)
            self._pin_for_signature = False  # one VERIFY, one signature
        elif not self._pin_verified:
            raise CardStatus(SW_SECURITY_STATUS)
        key = self._private_keys[command.p2]
        if 0x81 in template:
            result = self._private_operation(key, template[0x81])
        elif 0x85 in template and isinstance(key, ec.EllipticCurvePrivateKey):
            try:
                peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, template[0x85])
            except ValueError as exc:
                raise CardStatus(SW_WRONG_DATA) from exc
            result = key.exchange(ec.ECDH(), peer)
        else:
            raise CardStatus(SW_WRONG_DATA)
        return tlv.tlv(0x7C, tlv.tlv(0x82, result))

    @staticmethod
    def _private_operation(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
                           challenge: bytes) -> bytes:
        if isinstance(key, rsa.RSAPrivateKey):
            size = key.key_size // 8
            numbers = key.private_numbers()
            value = int.from_bytes(challenge, "big")
            if len(challenge) != size or value >= numbers.public_numbers.n:
                raise CardStatus(SW_WRONG_DATA)
            # Raw RSA by the Chinese remainder theorem: the same result as c^d mod n.
            m1 = pow(value, numbers.dmp1, numbers.p)
            m2 = pow(value, numbers.dmq1, numbers.q)
            h = (numbers.iqmp * (m1 - m2)) % numbers.p
            return (m2 + h * numbers.q).to_bytes(size, "big")
        size = (key.curve.key_size + 7) // 8
        if len(challenge) != size:
            raise CardStatus(SW_WRONG_DATA)
        digest = {32: hashes.SHA256(), 48: hashes.SHA384()}[size]
        return key.sign(challenge, ec.ECDSA(utils.Prehashed(digest)))

    # Data objects ---------------------------------------------------------------------

    @staticmethod
    def _object_tag(data: bytes) -> tuple[int, bytes]:
        """The 5C tag list's tag, and what follows the tag list."""
        try:
            items = tlv.parse(data)
        except ValueError as exc:
            raise CardStatus(SW_WRONG_DATA) from exc
        if not items or items[0][0] != 0x5C or not 1 <= len(items[0][1]) <= 3:
            raise CardStatus(SW_WRONG_DATA)
        tag = int.from_bytes(items[0][1], "big")
        rest = data[len(tlv.tlv(0x5C, items[0][1])):]
        return tag, rest

    def _get_data(self, command: Command) -> bytes:
        if (command.p1, command.p2) != (0x3F, 0xFF):
            raise CardStatus(SW_WRONG_P1P2)
        tag, rest = self._object_tag(command.data)
        if rest:
            raise CardStatus(SW_WRONG_DATA)
        value = self.state.objects.get(tag)
        if value is None:
            raise CardStatus(SW_NOT_FOUND)
        return tlv.tlv(TAG_DISCOVERY if tag == TAG_DISCOVERY else 0x53, value)

    def _put_data(self, command: Command) -> bytes:
        if (command.p1, command.p2) != (0x3F, 0xFF):
            raise CardStatus(SW_WRONG_P1P2)
        if not self._admin:
            raise CardStatus(SW_SECURITY_STATUS)
        try:
            if command.data[:1] == b"\x7e":  # the discovery object comes without 5C
                tag, rest = TAG_DISCOVERY, command.data
                (outer, value), = tlv.parse(rest)
            else:
                tag, rest = self._object_tag(command.data)
                (outer, value), = tlv.parse(rest)
        except ValueError as exc:
            raise CardStatus(SW_WRONG_DATA) from exc
        if outer != (TAG_DISCOVERY if tag == TAG_DISCOVERY else 0x53):
            raise CardStatus(SW_WRONG_DATA)
        if len(value) > MAX_OBJECT_SIZE:
            raise CardStatus(SW_NOT_ENOUGH_MEMORY)
        if value:
            self.state.objects[tag] = value
        else:  # an empty object deletes it
            self.state.objects.pop(tag, None)
        self.state.save()
        return b""

    # GET CHALLENGE --------------------------------------------------------------------

    def _get_challenge(self, command: Command) -> bytes:
        if (command.p1, command.p2) != (0x00, 0x00):
            raise CardStatus(SW_WRONG_P1P2)
        if command.data:
            raise CardStatus(SW_WRONG_LENGTH)
        return secrets.token_bytes(min(command.ne, 256))
