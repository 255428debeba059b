"""Signing with a private key that lives in a PKCS#11 token (a secure element), through
python-pkcs11.

Data is hashed here and only the digest goes to the token (`CKM_ECDSA`, or `CKM_RSA_PKCS`
over a DigestInfo), so tokens offering raw mechanisms only work too. `Pkcs11Signer` gives
the signature in the two shapes p11grid needs: JWS (RFC 7518: RS256, ES256, ES384 with raw
r||s) and X.509/CSR (PKCS#1 v1.5, or a DER ECDSA-Sig-Value).

Process-wide state, by PKCS#11's design: a library is loaded and initialised once per
process (`pkcs11.lib`), and a token's login is shared by all sessions of the process. So
`environment` entries (SoftHSM2's `SOFTHSM2_CONF`) are written into `os.environ` before a
library is first loaded and then stay for the whole process; and signers on one token
share one login, which ends when the last of them closes (while it lasts, a signer given
no PIN uses it too; one given a different PIN is refused).

python-pkcs11 is imported lazily, so `import idm` (and this module) does not load it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from idm import der
from idm.pkcs11_uri import Pkcs11Uri

log = logging.getLogger("p11grid.identity")

# python-pkcs11's objects are typed Any here: importing its types would load it.

KINDS = ("ec256", "ec384", "rsa2048")

# DER namedCurve OIDs as CKA_EC_PARAMS carries them: P-256 (1.2.840.10045.3.1.7) and
# P-384 (1.3.132.0.34).
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")
_P384_PARAMS = bytes.fromhex("06052b81040022")
_MIN_RSA_BITS = 2048  # RFC 7518 section 3.3


class SignerError(Exception):
    """The token, its PIN or its key cannot be used for signing; the message says why."""


class ModuleLoadError(SignerError):
    """The PKCS#11 library cannot be loaded or initialised."""


class TokenNotFound(SignerError):
    """No token matches the URI."""


class TokenAmbiguous(SignerError):
    """Several tokens match the URI."""


class PinRejected(SignerError):
    """The token refused the PIN (wrong, locked or expired)."""


class KeyNotFound(SignerError):
    """No private key (or no public half for it) matches the URI."""


class KeyAmbiguous(SignerError):
    """Several keys match the URI."""


class KeyExists(SignerError):
    """generate_key_pair refused: a key with that label or id is already in the token."""


class UnsupportedKey(SignerError):
    """A key type, size or curve this signer does not sign with (RSA >= 2048, P-256, P-384)."""


@dataclass(frozen=True)
class _Algorithm:
    jws: str
    hash_name: str  # hashlib name
    coordinate_size: int  # bytes per ECDSA r and s; 0 for RSA


_ES256 = _Algorithm("ES256", "sha256", 32)
_ES384 = _Algorithm("ES384", "sha384", 48)
_RS256 = _Algorithm("RS256", "sha256", 0)


# --- libraries: one per module path per process --------------------------------------

_libraries: dict[str, Any] = {}
_environments: dict[str, dict[str, str]] = {}  # what each library was initialized with
# Re-entrant: a library may itself sign through another one while it loads or logs in
# (our own PKCS#11 module's identity gate signs with the hypervisor's key inside C_Login).
_libraries_lock = threading.RLock()


_pid = os.getpid()


@contextmanager
def _environment_set(wanted: dict[str, str]) -> Iterator[None]:
    """`wanted` in os.environ while a library (re)initializes, which is when it reads it
    (SoftHSM2_CONF); the previous values come back afterwards: the host process must not
    inherit the hypervisor token's settings."""
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_over_after_fork() -> None:
    """In a forked child the parent's logins and sessions are not ours, and PKCS#11 wants
    C_Initialize again (SoftHSM2 allows it with `library.reset_on_fork = true`)."""
    global _pid
    if _pid == os.getpid():
        return
    _pid = os.getpid()
    _logins.clear()
    for key, library in _libraries.items():
        with _environment_set(_environments.get(key, {})):  # C_Initialize reads it again
            try:
                try:
                    library.finalize()  # the parent's state; a child may be refused: fine
                except Exception:
                    pass
                library.initialize()
            except Exception as exc:  # the next use reports what the library says
                log.info("re-initializing %s after fork: %s", key, exc)


def _library(module: Path, environment: dict[str, str] | None) -> Any:
    """The loaded library for `module`, loading it the first time with `environment` set
    in os.environ while it initializes (restored afterwards: the host process, nginx say,
    must not inherit the hypervisor token's SOFTHSM2_CONF)."""
    key = str(module)
    wanted = dict(environment or {})
    with _libraries_lock:
        _start_over_after_fork()
        loaded = _libraries.get(key)
        if loaded is not None and loaded.initialized:
            for name, value in wanted.items():
                had = _environments.get(key, {}).get(name, os.environ.get(name))
                if had != value:
                    # The library read its environment when it was initialised; a different
                    # value now would silently be ignored.
                    raise ModuleLoadError(
                        f"{module} is already loaded in this process with {name}="
                        f"{had!r}; it cannot be reloaded with {value!r}")
            return loaded
        with _environment_set(wanted):
            try:
                import pkcs11

                library = pkcs11.lib(key)
            except Exception as exc:  # OSError-like load failures and C_Initialize errors
                hint = " (SoftHSM2 reads its configuration from SOFTHSM2_CONF: pass it in " \
                    "environment)" if "softhsm" in key.lower() and not environment else ""
                raise ModuleLoadError(f"cannot load the PKCS#11 library {module}: {exc}"
                                      f"{hint}") from None
        _environments[key] = wanted
        _libraries[key] = library
        return library


# --- logins: one per token per process, shared by reference count ---------------------

@dataclass
class _Login:
    session: Any  # the session that logged in; closing it logs the whole process out
    pin_mac: bytes
    users: int


_logins: dict[tuple[str, int], _Login] = {}
_logins_lock = threading.RLock()
_PIN_KEY = secrets.token_bytes(32)  # so that only a keyed hash of a PIN stays in memory


def _pin_mac(pin: str) -> bytes:
    return hmac.new(_PIN_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


def _pin_error(exc: Exception, token_label: str) -> PinRejected | None:
    from pkcs11 import exceptions as errors

    if isinstance(exc, errors.PinIncorrect | errors.PinInvalid | errors.PinLenRange):
        return PinRejected(f"token {token_label!r} rejected the PIN: wrong PIN")
    if isinstance(exc, errors.PinLocked):
        return PinRejected(f"token {token_label!r}: the user PIN is locked (too many wrong "
                           "PINs); the security officer must reset it")
    if isinstance(exc, errors.PinExpired):
        return PinRejected(f"token {token_label!r}: the user PIN has expired")
    if isinstance(exc, errors.UserPinNotInitialized):
        return PinRejected(f"token {token_label!r} has no user PIN set yet")
    return None


def _login(module: Path, token: Any, pin: str | None) -> tuple[str, int] | None:
    """Log the process in to `token` (or join an existing login); the key to release."""
    from pkcs11 import exceptions as errors

    key = (str(module), int(token.slot.slot_id))
    with _logins_lock:
        current = _logins.get(key)
        if current is not None:
            if pin is not None and not hmac.compare_digest(current.pin_mac, _pin_mac(pin)):
                raise PinRejected(f"token {token.label!r} is already logged in in this "
                                  "process with a different PIN: wrong PIN")
            current.users += 1
            return key
        if pin is None:
            return None
        try:
            session = token.open(user_pin=pin)
        except errors.UserAlreadyLoggedIn:
            # Logged in by other code in this process: use that login, and leave it alone.
            return None
        except errors.PKCS11Error as exc:
            raise _pin_error(exc, token.label) or SignerError(
                f"token {token.label!r}: login failed: {_describe(exc)}") from None
        _logins[key] = _Login(session, _pin_mac(pin), 1)
        return key


def _logout(key: tuple[str, int] | None) -> None:
    if key is None:
        return
    with _logins_lock:
        current = _logins.get(key)
        if current is None:
            return
        current.users -= 1
        if current.users > 0:
            return
        del _logins[key]
        # Still under the lock: a login starting now must not race this logout.
        try:
            current.session.close()
        except Exception:  # the token may be gone; the login goes with it
            pass


# --- tokens and objects -------------------------------------------------------------

def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _strip(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).rstrip(" \x00")


def _token_filter(uri: Pkcs11Uri) -> str:
    named = [f"{wire}={value!r}" for wire, value in (
        ("token", uri.token), ("serial", uri.serial), ("manufacturer", uri.manufacturer),
        ("model", uri.model), ("slot-id", uri.slot_id),
        ("slot-description", uri.slot_description),
        ("slot-manufacturer", uri.slot_manufacturer)) if value is not None]
    return ", ".join(named) or "any token"


def _check_library(library: Any, module: Path, uri: Pkcs11Uri) -> None:
    checks = (("library-manufacturer", uri.library_manufacturer, library.manufacturer_id),
              ("library-description", uri.library_description, library.library_description))
    for wire, wanted, actual in checks:
        if wanted is not None and _strip(actual) != wanted:
            raise TokenNotFound(f"{module} is not the library the URI names: {wire} is "
                                f"{_strip(actual)!r}, not {wanted!r}")
    if uri.library_version is not None:
        major, _, minor = uri.library_version.partition(".")
        wanted_version = (int(major), int(minor or 0))
        if tuple(library.library_version) != wanted_version:
            raise TokenNotFound(f"{module} is not the library the URI names: library-version "
                                f"is {'.'.join(map(str, library.library_version))}, not "
                                f"{uri.library_version}")


# SoftHSM2 reads its token directories once, in C_Initialize, and skips a token whose
# token.object another process is rewriting at that moment (it does at every login): the
# token then stays missing for this process's life. So a token not found is looked for
# again after initializing the library anew, a few times, while this process holds no
# login on that library (a login would be lost with it).
_TOKEN_RETRY_DELAYS = (0.05, 0.1, 0.2)


def _find_token(library: Any, module: Path, uri: Pkcs11Uri) -> Any:
    for delay in (*_TOKEN_RETRY_DELAYS, None):
        try:
            return _find_token_once(library, module, uri)
        except TokenNotFound:
            if delay is None or not _initialize_again(module, library, delay):
                raise
    raise AssertionError("unreachable")


def _initialize_again(module: Path, library: Any, delay: float) -> bool:
    """C_Finalize and C_Initialize `library` after `delay` seconds, with the environment it
    was loaded with; False (nothing done) while a login of this process depends on it."""
    key = str(module)
    with _libraries_lock, _logins_lock:
        if any(login_key[0] == key for login_key in _logins):
            return False
        time.sleep(delay)
        with _environment_set(_environments.get(key, {})):
            try:
                library.finalize()
                library.initialize()
            except Exception as exc:  # whatever the library says, reported once
                log.info("initializing %s again to look for its token: %s", module, exc)
                return False
    log.info("%s: token not found; looked again after initializing the library anew", module)
    return True


def _find_token_once(library: Any, module: Path, uri: Pkcs11Uri) -> Any:
    from pkcs11 import TokenFlag
    from pkcs11 import exceptions as errors

    _check_library(library, module, uri)
    matches, present = [], []
    try:
        slots = library.get_slots(token_present=True)
    except errors.PKCS11Error as exc:
        raise SignerError(f"{module}: cannot list slots: {_describe(exc)}") from None
    for slot in slots:
        try:
            token = slot.get_token()
        except (errors.TokenNotPresent, errors.TokenNotRecognised):
            continue
        except errors.PKCS11Error as exc:
            raise SignerError(f"{module}: slot {slot.slot_id}: {_describe(exc)}") from None
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue  # SoftHSM2's spare slot, say: nothing to sign with there
        present.append(token.label)
        wanted = ((uri.token, token.label), (uri.serial, _strip(token.serial)),
                  (uri.manufacturer, token.manufacturer_id), (uri.model, token.model),
                  (uri.slot_id, slot.slot_id), (uri.slot_description, slot.slot_description),
                  (uri.slot_manufacturer, slot.manufacturer_id))
        if all(want is None or want == (have if isinstance(want, int) else _strip(have))
               for want, have in wanted):
            matches.append(token)
    if not matches:
        listed = ", ".join(repr(label) for label in present) or "none"
        raise TokenNotFound(f"no token in {module} matches {_token_filter(uri)} "
                            f"(tokens present: {listed})")
    if len(matches) > 1:
        raise TokenAmbiguous(f"{len(matches)} tokens in {module} match {_token_filter(uri)}; "
                             "add serial= (or a unique token=) to the URI")
    return matches[0]


def _key_filter(label: str | None, key_id: bytes | None) -> str:
    named = []
    if label is not None:
        named.append(f"label {label!r}")
    if key_id is not None:
        named.append(f"id {key_id.hex() or '(empty)'}")
    return " and ".join(named) or "any label or id"


def _objects(session: Any, object_class: Any, label: str | None,
             key_id: bytes | None) -> list[Any]:
    from pkcs11 import Attribute

    template: dict[Any, Any] = {Attribute.CLASS: object_class}
    if label is not None:
        template[Attribute.LABEL] = label
    if key_id is not None:
        template[Attribute.ID] = key_id
    return list(session.get_objects(template))


def _algorithm_of(private_key: Any) -> _Algorithm:
    from pkcs11 import Attribute, KeyType

    key_type = private_key[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        return _RS256
    if key_type == KeyType.EC:
        params = bytes(private_key[Attribute.EC_PARAMS])
        if params == _P256_PARAMS:
            return _ES256
        if params == _P384_PARAMS:
            return _ES384
        raise UnsupportedKey(f"EC key {private_key.label!r} is on a curve other than P-256 "
                             f"and P-384 (EC_PARAMS {params.hex()})")
    name = getattr(key_type, "name", str(key_type))
    raise UnsupportedKey(f"key {private_key.label!r} is of type {name}; RSA and EC (P-256, "
                         "P-384) are supported")


def _ec_point(value: bytes, size: int) -> bytes:
    """The uncompressed point from CKA_EC_POINT: DER OCTET STRING (the standard) or raw
    (some tokens)."""
    raw_length = 1 + 2 * size
    if len(value) == raw_length:
        return value
    if len(value) == raw_length + 2 and value[0] == 0x04 and value[1] == raw_length:
        return value[2:]
    raise UnsupportedKey(f"CKA_EC_POINT of {len(value)} bytes is not an uncompressed point")


def _public_from_object(obj: Any, algorithm: _Algorithm) -> rsa.RSAPublicKey | \
        ec.EllipticCurvePublicKey:
    from pkcs11 import Attribute, KeyType, ObjectClass

    if obj[Attribute.CLASS] == ObjectClass.CERTIFICATE:
        public = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE])).public_key()
    elif obj[Attribute.KEY_TYPE] == KeyType.RSA:
        public = rsa.RSAPublicNumbers(
            int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(obj[Attribute.MODULUS], "big")).public_key()
    elif obj[Attribute.KEY_TYPE] == KeyType.EC:
        curve: ec.EllipticCurve = ec.SECP256R1() if algorithm is _ES256 else ec.SECP384R1()
        point = _ec_point(bytes(obj[Attribute.EC_POINT]), algorithm.coordinate_size)
        public = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    else:
        raise UnsupportedKey(f"public object {obj[Attribute.LABEL]!r} is not RSA or EC")
    if algorithm is _RS256:
        if not isinstance(public, rsa.RSAPublicKey):
            raise UnsupportedKey("the public half found is not an RSA key")
        return public
    wanted = ec.SECP256R1 if algorithm is _ES256 else ec.SECP384R1
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            not isinstance(public.curve, wanted):
        raise UnsupportedKey(f"the public half found is not a {wanted.name} key")
    return public


def _public_key(session: Any, private_key: Any, algorithm: _Algorithm
                ) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The public half: the public-key object with the private key's id (or label), else
    a certificate with it, else (RSA) the modulus the private key carries."""
    from pkcs11 import Attribute, ObjectClass

    key_id = bytes(private_key[Attribute.ID] or b"")
    label = private_key[Attribute.LABEL]
    for object_class in (ObjectClass.PUBLIC_KEY, ObjectClass.CERTIFICATE):
        # By id when there is one (the PKCS#11 convention pairing the halves), narrowed by
        # label if the id alone is shared.
        if key_id:
            found = _objects(session, object_class, None, key_id)
            if len(found) > 1:
                found = [obj for obj in found if obj[Attribute.LABEL] == label] or found
        else:
            found = _objects(session, object_class, label, None)
        if len(found) == 1:
            return _public_from_object(found[0], algorithm)
        if found:
            kind = "public keys" if object_class == ObjectClass.PUBLIC_KEY else "certificates"
            raise KeyAmbiguous(f"{len(found)} {kind} match "
                               f"{_key_filter(label, key_id or None)}")
    if algorithm is _RS256:
        try:
            return _public_from_object(private_key, algorithm)
        except Exception:  # modulus not readable on this token: fall through
            pass
    raise KeyNotFound(f"no public key or certificate for the private key "
                      f"{_key_filter(label, key_id or None)}")


class Pkcs11Signer:
    """One private key in one token, logged in, ready to sign JWS and X.509 structures.

    The token is found by the URI's token/slot attributes (exactly one must match), the
    key by `object` (CKA_LABEL) and `id` (CKA_ID) among the private keys (exactly one).
    """

    def __init__(self, module: Path, uri: Pkcs11Uri, pin: str | None,
                 environment: dict[str, str] | None = None) -> None:
        from pkcs11 import ObjectClass
        from pkcs11 import exceptions as errors

        if uri.type not in (None, "private"):
            raise KeyNotFound(f"the URI names an object of type {uri.type!r}; a signer needs "
                              "the private key (type=private, or no type)")
        self._lock = threading.Lock()
        self._session: Any = None
        self._login: tuple[str, int] | None = None
        library = _library(module, environment)
        token = _find_token(library, module, uri)
        self.token_label: str = token.label
        self._login = _login(module, token, pin)
        try:
            # Our own session; the login (shared per process) makes private objects
            # visible in it.
            self._session = token.open()
            found = _objects(self._session, ObjectClass.PRIVATE_KEY, uri.object, uri.id)
            if not found:
                hint = "" if pin is not None else \
                    " (no PIN was given: private keys are only visible after login)"
                raise KeyNotFound(f"no private key with {_key_filter(uri.object, uri.id)} in "
                                  f"token {token.label!r}{hint}")
            if len(found) > 1:
                raise KeyAmbiguous(f"{len(found)} private keys match "
                                   f"{_key_filter(uri.object, uri.id)} in token "
                                   f"{token.label!r}; add id= (or a unique object=) to the URI")
            self._private_key = found[0]
            self._algorithm = _algorithm_of(self._private_key)
            self._public = _public_key(self._session, self._private_key, self._algorithm)
            if isinstance(self._public, rsa.RSAPublicKey) and \
                    self._public.key_size < _MIN_RSA_BITS:
                raise UnsupportedKey(f"RSA key of {self._public.key_size} bits: RS256 needs "
                                     f"at least {_MIN_RSA_BITS}")
        except errors.PKCS11Error as exc:
            self.close()
            raise SignerError(f"token {token.label!r}: {_describe(exc)}") from None
        except BaseException:
            self.close()
            raise

    # -- what the key is

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        return self._public

    @property
    def jws_algorithm(self) -> str:
        """The JWS "alg" (RFC 7518): RS256, ES256 or ES384."""
        return self._algorithm.jws

    # -- signing

    def _sign_digest(self, data: bytes) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11 import exceptions as errors

        digest = hashlib.new(self._algorithm.hash_name, data).digest()
        with self._lock:
            if self._session is None:
                raise SignerError("the signer is closed")
            try:
                if self._algorithm is _RS256:
                    return bytes(self._private_key.sign(der.SHA256_DIGEST_INFO + digest,
                                                        mechanism=Mechanism.RSA_PKCS))
                signature = bytes(self._private_key.sign(digest, mechanism=Mechanism.ECDSA))
            except errors.PKCS11Error as exc:
                raise SignerError(f"token {self.token_label!r}: signing failed: "
                                  f"{_describe(exc)}") from None
        if len(signature) != 2 * self._algorithm.coordinate_size:
            raise SignerError(f"token {self.token_label!r} returned an ECDSA signature of "
                              f"{len(signature)} bytes, not r||s of "
                              f"{2 * self._algorithm.coordinate_size}")
        return signature

    def certificate(self) -> x509.Certificate | None:
        """The certificate stored in the token next to the key (same id, else same
        label), if there is exactly one: what an operator need not then give by file."""
        from pkcs11 import Attribute, ObjectClass

        with self._lock:
            if self._session is None:
                raise SignerError("the signer is closed")
            key_id = bytes(self._private_key[Attribute.ID] or b"")
            label = self._private_key[Attribute.LABEL]
            found = _objects(self._session, ObjectClass.CERTIFICATE, None, key_id) \
                if key_id else []
            found = found or _objects(self._session, ObjectClass.CERTIFICATE, label, None)
            if len(found) != 1:
                return None
            return x509.load_der_x509_certificate(bytes(found[0][Attribute.VALUE]))

    def store_certificate(self, certificate: x509.Certificate) -> None:
        """Keep `certificate` in the token next to the key (its CKA_ID and label), in
        place of the certificates stored there before, so that `certificate()` and
        `p11grid token issue` find the current one after a renewal. The new object is made
        before the old ones go: a failure leaves the token as it was."""
        from cryptography.hazmat.primitives import serialization
        from pkcs11 import Attribute, CertificateType, ObjectClass
        from pkcs11 import exceptions as errors

        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if certificate.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                self._public.public_bytes(serialization.Encoding.DER, spki):
            raise SignerError(f"token {self.token_label!r}: the certificate is for another "
                              "key; not stored")
        serial = certificate.serial_number
        with self._lock:
            if self._session is None:
                raise SignerError("the signer is closed")
            key_id = bytes(self._private_key[Attribute.ID] or b"")
            label = self._private_key[Attribute.LABEL]
            try:
                with self._session.token.open(rw=True) as session:
                    old = _objects(session, ObjectClass.CERTIFICATE, None, key_id) if key_id \
                        else _objects(session, ObjectClass.CERTIFICATE, label, None)
                    session.create_object({
                        Attribute.CLASS: ObjectClass.CERTIFICATE,
                        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                        Attribute.TOKEN: True, Attribute.PRIVATE: False,
                        Attribute.ID: key_id, Attribute.LABEL: label,
                        Attribute.SUBJECT: certificate.subject.public_bytes(),
                        Attribute.ISSUER: certificate.issuer.public_bytes(),
                        Attribute.SERIAL_NUMBER: der.tlv(0x02, serial.to_bytes(
                            serial.bit_length() // 8 + 1, "big")),
                        Attribute.VALUE: certificate.public_bytes(serialization.Encoding.DER)})
                    for obj in old:
                        obj.destroy()
            except errors.PKCS11Error as exc:
                raise SignerError(f"token {self.token_label!r}: cannot store the certificate: "
                                  f"{_describe(exc)}") from None

    def decrypt(self, header_algorithm: str, wrapped_key: bytes) -> bytes:
        """A result container's key, unwrapped by the RSA key in the token (idm.container's
        Unwrapper): RSA-OAEP with SHA-256 or SHA-1."""
        from pkcs11 import MGF, Mechanism
        from pkcs11 import exceptions as errors

        parameters = {"rsa-oaep-sha256": (Mechanism.SHA256, MGF.SHA256, None),
                      "rsa-oaep-sha1": (Mechanism.SHA_1, MGF.SHA1, None)}.get(header_algorithm)
        if parameters is None or self._algorithm is not _RS256:
            raise SignerError(f"token {self.token_label!r}: cannot unwrap a "
                              f"{header_algorithm} header with this key")
        with self._lock:
            if self._session is None:
                raise SignerError("the signer is closed")
            try:
                return bytes(self._private_key.decrypt(wrapped_key,
                                                       mechanism=Mechanism.RSA_PKCS_OAEP,
                                                       mechanism_param=parameters))
            except errors.PKCS11Error as exc:
                raise SignerError(f"token {self.token_label!r}: unwrapping failed: "
                                  f"{_describe(exc)}") from None

    def sign_jws(self, signing_input: bytes) -> bytes:
        """The JWS signature over `signing_input` (ASCII(header '.' payload)) for
        `jws_algorithm`: PKCS#1 v1.5 for RS256, fixed-length r||s for ES256/ES384."""
        return self._sign_digest(signing_input)

    def sign_x509(self, tbs: bytes) -> bytes:
        """The signature as certificates and CSRs carry it: PKCS#1 v1.5 with SHA-256, or a
        DER ECDSA-Sig-Value (SHA-256 for P-256, SHA-384 for P-384)."""
        signature = self._sign_digest(tbs)
        if self._algorithm is _RS256:
            return signature
        size = self._algorithm.coordinate_size
        return encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                    int.from_bytes(signature[size:], "big"))

    # -- lifetime

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            login, self._login = self._login, None
        if session is not None:
            try:
                session.close()
            except Exception:  # the token may be gone already
                pass
        _logout(login)

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        algorithm = getattr(self, "_algorithm", None)
        state = "closed" if self._session is None or algorithm is None else algorithm.jws
        return f"Pkcs11Signer(token={getattr(self, 'token_label', '?')!r}, {state})"


def generate_key_pair(module: Path, uri: Pkcs11Uri, pin: str, kind: str,
                      environment: dict[str, str] | None = None) -> None:
    """Generate a key pair inside the token: "ec256", "ec384" or "rsa2048".

    Label = the URI's `object` (required), id = its `id`, else the first 8 bytes of the
    label's SHA-1. The private half is sensitive and never extractable, and both halves
    only sign/verify. Refused (KeyExists) if a key with that label or id is there already.
    """
    from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
    from pkcs11 import exceptions as errors

    if kind not in KINDS:
        raise UnsupportedKey(f"key kind {kind!r}: choose one of {', '.join(KINDS)}")
    if not uri.object:
        raise SignerError("generating a key needs object=<label> in the URI")
    if uri.type not in (None, "private"):
        raise SignerError(f"the URI names an object of type {uri.type!r}; a key pair is "
                          "named by its private key (type=private, or no type)")
    label = uri.object
    key_id = uri.id if uri.id else hashlib.sha1(label.encode("utf-8")).digest()[:8]
    library = _library(module, environment)
    token = _find_token(library, module, uri)
    login = _login(module, token, pin)
    try:
        with token.open(rw=True) as session:
            # Public keys too: an orphan half would pair with the new key by label or id.
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for clash, search in ((f"label {label!r}", (label, None)),
                                      (f"id {key_id.hex()}", (None, key_id))):
                    if _objects(session, object_class, *search):
                        raise KeyExists(f"token {token.label!r} already holds a key with "
                                        f"{clash}; refusing to generate over it")
            capabilities = MechanismFlag.SIGN | MechanismFlag.VERIFY
            if kind == "rsa2048":
                # An RSA hypervisor key also opens result containers sealed to it (the
                # container's AES key, RSA-OAEP): decryption, never export.
                capabilities |= MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
            # SIGN_RECOVER off explicitly: some SoftHSM2 builds (Debian 13) default it on.
            private_template = {Attribute.TOKEN: True, Attribute.PRIVATE: True,
                                Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                Attribute.SIGN_RECOVER: False}
            public_template = {Attribute.TOKEN: True, Attribute.PRIVATE: False}
            common: dict[str, Any] = dict(
                id=key_id, label=label, store=True, capabilities=capabilities,
                private_template=private_template, public_template=public_template)
            if kind == "rsa2048":
                session.generate_keypair(KeyType.RSA, 2048, **common)
            else:
                params = _P256_PARAMS if kind == "ec256" else _P384_PARAMS
                session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: params}, local=True,
                ).generate_keypair(**common)
    except errors.PKCS11Error as exc:
        raise SignerError(f"token {token.label!r}: generating a {kind} key pair failed: "
                          f"{_describe(exc)}") from None
    finally:
        _logout(login)

