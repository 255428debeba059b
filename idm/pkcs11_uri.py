"""PKCS#11 URIs (RFC 7512): the one place in p11grid that parses and formats them.

`parse_pkcs11_uri("pkcs11:token=vm-se;object=vm-ec;type=private?pin-source=file:/run/pin")`
gives a frozen `Pkcs11Uri`; `str()` formats it back. The parser is strict: attributes
outside RFC 7512 are refused unless they carry the vendor prefix `x-`, every attribute may
appear once, and characters the grammar does not allow must be percent-encoded. A
`pin-value` never appears in an error message or in `repr()`; `str()` keeps it, since that
is the URI itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import unquote

SCHEME = "pkcs11"
OBJECT_TYPES = ("cert", "data", "private", "public", "secret-key")

# RFC 3986 unreserved plus RFC 7512's pk11-res-avail; the path also allows "&" unencoded,
# the query "/", "?" and "|" (its own delimiter "&" must be encoded there).
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_RES_AVAIL = frozenset(":[]@!$'()*+,=")
_PATH_CHARS = _UNRESERVED | _RES_AVAIL | {"&"}
_QUERY_CHARS = _UNRESERVED | _RES_AVAIL | {"/", "?", "|"}
_HEX = frozenset("0123456789abcdefABCDEF")
_VENDOR_NAME = re.compile(r"x-[A-Za-z0-9_-]+\Z")
_LIBRARY_VERSION = re.compile(r"[0-9]+(\.[0-9]+)?\Z")
_SCHEME_LIKE = re.compile(r"[a-z][a-z0-9+.-]{0,15}\Z")  # a plausible scheme, echoed

# Wire name -> field name, in the order __str__ writes them (token first, object last:
# the order RFC 7512's examples mostly use).
_PATH_ATTRIBUTES = {
    "token": "token",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "library-version": "library_version",
    "slot-description": "slot_description",
    "slot-manufacturer": "slot_manufacturer",
    "slot-id": "slot_id",
    "object": "object",
    "type": "type",
    "id": "id",
}
_QUERY_ATTRIBUTES = {
    "pin-source": "pin_source",
    "pin-value": "pin_value",
    "module-name": "module_name",
    "module-path": "module_path",
}
_SECRET = "pin-value"


class UriError(ValueError):
    """Not a usable PKCS#11 URI; the message names the offending part (never a PIN)."""


@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 URI. None = attribute absent; "" (or b"") = present and empty."""

    # Path: token and slot.
    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    # Path: library.
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None  # "M" or "M.N", as written
    # Path: slot.
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    slot_id: int | None = None
    # Path: object.
    object: str | None = None  # CKA_LABEL
    type: str | None = None  # one of OBJECT_TYPES
    id: bytes | None = None  # CKA_ID, binary
    # Query.
    pin_source: str | None = None
    pin_value: str | None = None
    module_name: str | None = None
    module_path: str | None = None
    # Vendor attributes ("x-..."), in the order given: (name, value) pairs.
    vendor_path: tuple[tuple[str, str], ...] = ()
    vendor_query: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Built by hand as well as by the parser: keep both to the same rules so that
        # str() always gives a URI that parses back to an equal object.
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise UriError(f"type={self.type!r} is not one of {', '.join(OBJECT_TYPES)}")
        if self.slot_id is not None and (isinstance(self.slot_id, bool) or self.slot_id < 0):
            raise UriError(f"slot-id={self.slot_id!r} is not a non-negative integer")
        if self.library_version is not None and not _LIBRARY_VERSION.match(self.library_version):
            raise UriError(f"library-version={self.library_version!r} is not M or M.N "
                           "(decimal digits)")
        for where, pairs in (("path", self.vendor_path), ("query", self.vendor_query)):
            seen: set[str] = set()
            for name, _value in pairs:
                if not _VENDOR_NAME.match(name):
                    raise UriError(f"{where} attribute {name!r}: vendor attributes are named "
                                   "x-<letters, digits, '-', '_'>")
                if name in seen:
                    raise UriError(f"duplicate {where} attribute {name!r}")
                seen.add(name)
        texts = [(wire, getattr(self, name)) for wire, name in
                 (*_PATH_ATTRIBUTES.items(), *_QUERY_ATTRIBUTES.items())
                 if name not in ("id", "slot_id")]
        for wire, value in [*texts, *self.vendor_path, *self.vendor_query]:
            if value is None:
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # str() must be able to percent-encode it as UTF-8.
                shown = "" if wire == _SECRET else f"={value!r}"
                raise UriError(f"{wire}{shown} is not encodable as UTF-8") from None

    def __repr__(self) -> str:
        shown = []
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None or value == ():
                continue
            if item.name == "pin_value":
                value = "***"
                shown.append(f"{item.name}={value}")
            else:
                shown.append(f"{item.name}={value!r}")
        return f"Pkcs11Uri({', '.join(shown)})"

    def __str__(self) -> str:
        path = []
        for wire, name in _PATH_ATTRIBUTES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if name == "id":
                # Every byte encoded: the id is binary, and this is what RFC 7512 shows.
                text = "".join(f"%{octet:02X}" for octet in value)
            else:
                text = _encode(str(value), _PATH_CHARS)
            path.append(f"{wire}={text}")
        path += [f"{name}={_encode(value, _PATH_CHARS)}" for name, value in self.vendor_path]
        query = [f"{wire}={_encode(getattr(self, name), _QUERY_CHARS)}"
                 for wire, name in _QUERY_ATTRIBUTES.items() if getattr(self, name) is not None]
        query += [f"{name}={_encode(value, _QUERY_CHARS)}" for name, value in self.vendor_query]
        text = f"{SCHEME}:{';'.join(path)}"
        return f"{text}?{'&'.join(query)}" if query else text


def _encode(value: str, allowed: frozenset[str]) -> str:
    out = []
    for char in value:
        if char in allowed:
            out.append(char)
        else:
            out.extend(f"%{octet:02X}" for octet in char.encode("utf-8"))
    return "".join(out)


def _decode(raw: str, allowed: frozenset[str], name: str) -> bytes:
    """Percent-decode one attribute value; `name` is only used in messages."""
    secret = name == _SECRET
    out = bytearray()
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "%":
            pair = raw[index + 1:index + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                shown = "" if secret else f" {raw[index:index + 3]!r}"
                raise UriError(f"{name}: bad percent-encoding{shown} (expected % and two hex "
                               "digits)")
            out.append(int(pair, 16))
            index += 3
            continue
        if char not in allowed:
            shown = "a character" if secret else f"{char!r}"
            raise UriError(f"{name}: {shown} must be percent-encoded in a PKCS#11 URI")
        out.append(ord(char))
        index += 1
    return bytes(out)


def _text(raw: str, allowed: frozenset[str], name: str) -> str:
    try:
        return _decode(raw, allowed, name).decode("utf-8")
    except UnicodeDecodeError:
        raise UriError(f"{name}: not UTF-8 once percent-decoded") from None


def _split(part: str, where: str, separator: str) -> list[tuple[str, str]]:
    pairs = []
    for position, attribute in enumerate(part.split(separator), start=1):
        name, equals, value = attribute.partition("=")
        if not equals or not name:
            # A query piece without "=" might be a PIN pasted in the wrong place: only
            # its position is named there.
            shown = f"#{position}" if where == "query" else repr(attribute)
            raise UriError(f"{where} attribute {shown} is not name=value")
        pairs.append((name, value))
    return pairs


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """Parse an RFC 7512 URI; UriError names the offending part (never a pin-value)."""
    if not isinstance(text, str):
        raise UriError(f"a PKCS#11 URI is text, not {type(text).__name__}")
    scheme, colon, rest = text.partition(":")
    if not colon or scheme.lower() != SCHEME:
        shown = f" (scheme {scheme!r})" if colon and _SCHEME_LIKE.match(scheme) else ""
        raise UriError(f"not a PKCS#11 URI{shown}: it must start with 'pkcs11:'")
    if "#" in rest:
        raise UriError("a PKCS#11 URI has no fragment: '#' must be percent-encoded")
    path, question, query = rest.partition("?")
    values: dict[str, object] = {}
    vendor_path: list[tuple[str, str]] = []
    vendor_query: list[tuple[str, str]] = []
    seen: set[str] = set()

    for name, raw in _split(path, "path", ";") if path else ():
        if name in seen:
            raise UriError(f"duplicate path attribute {name!r}")
        seen.add(name)
        if name.startswith("x-"):
            if not _VENDOR_NAME.match(name):
                raise UriError(f"path attribute {name!r}: vendor attribute names are "
                               "x-<letters, digits, '-', '_'>")
            vendor_path.append((name, _text(raw, _PATH_CHARS, name)))
        elif name not in _PATH_ATTRIBUTES:
            hint = " (it belongs in the query, after '?')" if name in _QUERY_ATTRIBUTES else ""
            raise UriError(f"unknown path attribute {name!r}{hint}; vendor attributes "
                           "start with 'x-'")
        elif name == "id":
            values["id"] = _decode(raw, _PATH_CHARS, name)
        else:
            values[_PATH_ATTRIBUTES[name]] = _text(raw, _PATH_CHARS, name)

    if question:
        seen = set()
        for name, raw in _split(query, "query", "&") if query else ():
            if name in seen:
                raise UriError(f"duplicate query attribute {name!r}")
            seen.add(name)
            if name.startswith("x-"):
                if not _VENDOR_NAME.match(name):
                    raise UriError(f"query attribute {name!r}: vendor attribute names are "
                                   "x-<letters, digits, '-', '_'>")
                vendor_query.append((name, _text(raw, _QUERY_CHARS, name)))
            elif name not in _QUERY_ATTRIBUTES:
                hint = " (it belongs in the path, before '?')" if name in _PATH_ATTRIBUTES \
                    else ""
                raise UriError(f"unknown query attribute {name!r}{hint}; vendor attributes "
                               "start with 'x-'")
            else:
                values[_QUERY_ATTRIBUTES[name]] = _text(raw, _QUERY_CHARS, name)

    slot_id = values.get("slot_id")
    if slot_id is not None:
        if not (isinstance(slot_id, str) and slot_id.isascii() and slot_id.isdigit()):
            raise UriError(f"slot-id={slot_id!r} is not a decimal number")
        values["slot_id"] = int(slot_id)
    # type and library-version are checked by Pkcs11Uri itself.
    return Pkcs11Uri(**values, vendor_path=tuple(vendor_path),  # type: ignore[arg-type]
                     vendor_query=tuple(vendor_query))


def read_pin_source(source: str) -> str:
    """The PIN in the file a `pin-source` names: its first line, without the newline.

    `file:` URIs (RFC 8089: `file:/p`, `file:///p`, `file://localhost/p`, percent-encoded)
    and absolute paths are supported; other sources (p11-kit's `|program`) are not.
    """
    if source.startswith("file:"):
        rest = source[len("file:"):]
        if rest.startswith("//"):
            host, slash, rest = rest[2:].partition("/")
            if host not in ("", "localhost"):
                raise UriError(f"pin-source {source!r}: only local files are supported")
            rest = slash + rest
        path = Path(unquote(rest))
    else:
        path = Path(source)
    if not path.is_absolute():
        raise UriError(f"pin-source {source!r}: give a file: URI or an absolute path")
    try:
        with path.open("rb") as stream:
            line = stream.readline()
    except OSError as exc:
        raise UriError(f"pin-source {source!r}: {exc.strerror or exc}") from None
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise UriError(f"pin-source {source!r}: the first line is not UTF-8") from None


def resolve_pin(uri: Pkcs11Uri, explicit: str | None) -> str | None:
    """The PIN to log in with: `explicit` if given, else the URI's pin-value, else the
    first line of its pin-source, else None (no login)."""
    if explicit is not None:
        return explicit
    if uri.pin_value is not None:
        return uri.pin_value
    if uri.pin_source is not None:
        return read_pin_source(uri.pin_source)
    return None
