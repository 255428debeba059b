"""idm.pkcs11_uri (RFC 7512) and idm.pkcs11_signer against a real SoftHSM2 token.

The signer scenarios run in a child process (tests/idm_signer_host.py): python-pkcs11
and SoftHSM2 are process-wide, and this pytest process loads SoftHSM2 and our own module
for other tests. The child prints public keys, signatures and errors as JSON; this side
verifies them with `cryptography` (and PyJWT, when installed) and compares the public
keys with what pkcs11-tool reads from the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from idm.pkcs11_uri import (
    OBJECT_TYPES,
    Pkcs11Uri,
    UriError,
    parse_pkcs11_uri,
    resolve_pin,
)

ROOT = Path(__file__).resolve().parent.parent
HOST = Path(__file__).with_name("idm_signer_host.py")
SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN, SO_PIN, WRONG_PIN = "87654321", "12345678", "11112222"
SECRET = "Zq7-secret-4711"  # a pin-value that must never show up in errors or repr()

# --- the URI parser -------------------------------------------------------------------

# RFC 7512 section 3's examples (the vendor one with x- names, see BAD below), plus a slot
# one: (uri, expected fields, whether str() gives back exactly the same text).
GOOD: list[tuple[str, dict[str, Any], bool]] = [
    ("pkcs11:", {}, True),
    ("pkcs11:object=my-pubkey;type=public", {"object": "my-pubkey", "type": "public"}, True),
    ("pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
     {"object": "my-key", "type": "private", "pin_source": "file:/etc/token"}, True),
    ("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;"
     "model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial="
     "?pin-source=file:/etc/token_pin",
     {"token": "The Software PKCS#11 Softtoken", "manufacturer": "Snake Oil, Inc.",
      "model": "1.0", "object": "my-certificate", "type": "cert",
      "id": bytes.fromhex("69953e5cf4bdec91"), "serial": "",
      "pin_source": "file:/etc/token_pin"}, False),
    ("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
     {"object": "my-sign-key", "type": "private", "module_name": "mypkcs11"}, True),
    ("pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
     {"object": "my-sign-key", "type": "private", "module_path": "/mnt/libmypkcs11.so.1"},
     True),
    ("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc."
     "?pin-value=the-pin",
     {"token": "Software PKCS#11 softtoken", "manufacturer": "Snake Oil, Inc.",
      "pin_value": "the-pin"}, True),
    ("pkcs11:slot-description=Sun%20Metaslot", {"slot_description": "Sun Metaslot"}, True),
    ("pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;"
     "library-description=Soft%20Token%20Library;library-version=1.23",
     {"library_manufacturer": "Snake Oil, Inc.", "library_description": "Soft Token Library",
      "library_version": "1.23"}, True),
    ("pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;"
     "id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
     {"token": "My token% created by Joe", "library_version": "3",
      "id": bytes.fromhex("010203baddcafe040506")}, False),
    ("pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
     {"token": "A name with a substring %;", "object": "my-certificate", "type": "cert"},
     True),
    ("pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;"
     "object=my-certificate;type=cert",
     {"token": "Name with a small A with acute: \u00e1", "object": "my-certificate",
      "type": "cert"}, True),
    ("pkcs11:token=my-token;object=my-certificate;type=cert;x-vendor-aaa=value-a"
     "?pin-source=file:/etc/token_pin&x-vendor-bbb=value-b",
     {"token": "my-token", "object": "my-certificate", "type": "cert",
      "vendor_path": (("x-vendor-aaa", "value-a"),), "pin_source": "file:/etc/token_pin",
      "vendor_query": (("x-vendor-bbb", "value-b"),)}, True),
    ("pkcs11:token=vm-se;slot-manufacturer=SoftHSM%20project;slot-id=7;object=a&b;"
     "x-empty=?module-path=/opt/p11/lib.so%26more",
     {"token": "vm-se", "slot_manufacturer": "SoftHSM project", "slot_id": 7,
      "object": "a&b", "vendor_path": (("x-empty", ""),),
      "module_path": "/opt/p11/lib.so&more"}, True),
    ("PKCS11:id=", {"id": b""}, False),
]

BAD: list[tuple[str, str]] = [
    ("http://example.org/key", "not a PKCS#11 URI (scheme 'http'): it must start with"),
    ("token=t1;object=k", "it must start with 'pkcs11:'"),
    ("pkcs11:token=t1;colour=blue", "unknown path attribute 'colour'"),
    # RFC 7512's own vendor example: p11grid wants vendor names to carry the x- prefix.
    ("pkcs11:token=my-token;vendor-aaa=value-a", "unknown path attribute 'vendor-aaa'"),
    ("pkcs11:?colour=blue", "unknown query attribute 'colour'"),
    ("pkcs11:pin-source=file:/x", "unknown path attribute 'pin-source' (it belongs in the query"),
    ("pkcs11:?object=k", "unknown query attribute 'object' (it belongs in the path"),
    ("pkcs11:x-=1", "vendor attribute names are x-"),
    ("pkcs11:token=%4", "token: bad percent-encoding '%4'"),
    ("pkcs11:object=a%G0b", "object: bad percent-encoding '%G0'"),
    ("pkcs11:id=%0x", "id: bad percent-encoding '%0x'"),
    ("pkcs11:token=%C3%28", "token: not UTF-8 once percent-decoded"),
    ("pkcs11:token=my token", "token: ' ' must be percent-encoded"),
    ("pkcs11:object=a/b", "object: '/' must be percent-encoded"),
    ("pkcs11:?module-path=/a&b", "query attribute #2 is not name=value"),
    ("pkcs11:token=a#frag", "a PKCS#11 URI has no fragment"),
    ("pkcs11:token=a;token=b", "duplicate path attribute 'token'"),
    ("pkcs11:id=%01;object=k;id=%01", "duplicate path attribute 'id'"),
    ("pkcs11:?pin-source=/a&pin-source=/b", "duplicate query attribute 'pin-source'"),
    ("pkcs11:x-a=1;x-a=2", "duplicate path attribute 'x-a'"),
    ("pkcs11:type=key", "type='key' is not one of cert, data, private, public, secret-key"),
    ("pkcs11:type=Private", "type='Private' is not one of"),
    ("pkcs11:type=", "type='' is not one of"),
    ("pkcs11:slot-id=-1", "slot-id='-1' is not a decimal number"),
    ("pkcs11:slot-id=", "slot-id='' is not a decimal number"),
    ("pkcs11:library-version=1.2.3", "library-version='1.2.3' is not M or M.N"),
    ("pkcs11:token", "path attribute 'token' is not name=value"),
    ("pkcs11:token=a;", "path attribute '' is not name=value"),
]


@pytest.mark.parametrize(("text", "expected", "canonical"), GOOD,
                         ids=[f"rfc{n}" for n in range(len(GOOD))])
def test_good_uris_parse_and_round_trip(text: str, expected: dict[str, Any],
                                        canonical: bool) -> None:
    uri = parse_pkcs11_uri(text)
    assert uri == Pkcs11Uri(**expected)
    again = parse_pkcs11_uri(str(uri))
    assert again == uri
    assert str(again) == str(uri)
    if canonical:
        assert str(uri) == text


def test_id_is_binary_and_formatted_byte_by_byte() -> None:
    uri = parse_pkcs11_uri("pkcs11:id=A%00%ff;object=%E2%82%AC")
    assert uri.id == b"A\x00\xff"
    assert uri.object == "\u20ac"
    assert str(uri) == "pkcs11:object=%E2%82%AC;id=%41%00%FF"


@pytest.mark.parametrize(("text", "message"), BAD, ids=[text for text, _ in BAD])
def test_bad_uris_are_refused_with_the_part_named(text: str, message: str) -> None:
    with pytest.raises(UriError) as caught:
        parse_pkcs11_uri(text)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_pkcs11uri_checks_fields_built_by_hand() -> None:
    with pytest.raises(UriError, match="type='key'"):
        Pkcs11Uri(type="key")
    with pytest.raises(UriError, match="slot-id"):
        Pkcs11Uri(slot_id=-1)
    with pytest.raises(UriError, match="vendor attributes are named x-"):
        Pkcs11Uri(vendor_path=(("token", "t"),))
    with pytest.raises(UriError, match="duplicate query attribute 'x-a'"):
        Pkcs11Uri(vendor_query=(("x-a", "1"), ("x-a", "2")))
    with pytest.raises(UriError) as caught:
        Pkcs11Uri(pin_value=SECRET + "\ud800")
    assert SECRET not in str(caught.value)


LEAKY = [
    f"pkcs11:token=a;bogus=1?pin-value={SECRET}",
    f"pkcs11:token=%zz?pin-value={SECRET}",
    f"pkcs11:?pin-value={SECRET}%zz",
    f"pkcs11:?pin-value={SECRET}%F",
    f"pkcs11:?pin-value={SECRET} x",
    f"pkcs11:?pin-value={SECRET}%FF",
    f"pkcs11:?pin-value={SECRET}&pin-value={SECRET}",
    f"pkcs11:pin-value={SECRET}",
    f"pkcs11:?{SECRET}",
    f"pkcs12:?pin-value={SECRET}",
    f"{SECRET}:x",
    SECRET,
    f"pkcs11:type=bad?pin-value={SECRET}",
]


@pytest.mark.parametrize("text", LEAKY)
def test_pin_value_never_appears_in_errors(text: str) -> None:
    with pytest.raises(UriError) as caught:
        parse_pkcs11_uri(text)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


def test_pin_value_is_masked_in_repr_but_kept_in_str() -> None:
    uri = parse_pkcs11_uri(f"pkcs11:token=t1;object=k?pin-value={SECRET}")
    assert uri.pin_value == SECRET
    assert SECRET not in repr(uri)
    assert "pin_value=***" in repr(uri)
    assert "token='t1'" in repr(uri)
    assert f"pin-value={SECRET}" in str(uri)
    assert SECRET not in repr(Pkcs11Uri(token="t", pin_value=SECRET))
    assert SECRET not in repr([uri])  # containers use repr too


# Any Unicode but lone surrogates (not encodable as UTF-8, hence not in a URI).
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)
_VENDOR = st.lists(
    st.tuples(st.from_regex(r"x-[A-Za-z0-9_-]{1,12}", fullmatch=True), _TEXT),
    max_size=3, unique_by=lambda pair: pair[0]).map(tuple)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


URIS = st.builds(
    Pkcs11Uri,
    token=_maybe(_TEXT), manufacturer=_maybe(_TEXT), serial=_maybe(_TEXT),
    model=_maybe(_TEXT), library_manufacturer=_maybe(_TEXT),
    library_description=_maybe(_TEXT),
    library_version=_maybe(st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4})?", fullmatch=True)),
    slot_description=_maybe(_TEXT), slot_manufacturer=_maybe(_TEXT),
    slot_id=_maybe(st.integers(min_value=0, max_value=2**64 - 1)),
    object=_maybe(_TEXT), type=_maybe(st.sampled_from(OBJECT_TYPES)),
    id=_maybe(st.binary(max_size=24)),
    pin_source=_maybe(_TEXT), pin_value=_maybe(_TEXT), module_name=_maybe(_TEXT),
    module_path=_maybe(_TEXT), vendor_path=_VENDOR, vendor_query=_VENDOR,
)


@given(URIS)
def test_random_attribute_values_round_trip(uri: Pkcs11Uri) -> None:
    text = str(uri)
    assert text.isascii()
    assert parse_pkcs11_uri(text) == uri
    if uri.pin_value is not None:
        assert "pin_value=***" in repr(uri)


@given(st.text(max_size=60) | st.text(max_size=60).map(lambda tail: "pkcs11:" + tail))
def test_arbitrary_text_parses_or_raises_uri_error(text: str) -> None:
    try:
        uri = parse_pkcs11_uri(text)
    except UriError:
        return
    assert parse_pkcs11_uri(str(uri)) == uri


@given(pin=st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=6, max_size=16),
       broken=st.sampled_from(["%", "%g1", " ", "#", "&pin-value=x", "%C3"]))
def test_random_pins_stay_out_of_errors(pin: str, broken: str) -> None:
    secret = "PIN-" + pin  # the prefix keeps it from matching the message's own words
    for text in (f"pkcs11:?pin-value={secret}{broken}",
                 f"pkcs11:token={broken}?pin-value={secret}"):
        try:
            uri = parse_pkcs11_uri(text)
        except UriError as exc:
            assert secret not in str(exc)
        else:
            assert secret not in repr(uri)


def test_resolve_pin_prefers_explicit_then_pin_value(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("from-file\n")
    both = parse_pkcs11_uri(f"pkcs11:token=t?pin-value=from-uri&pin-source={pin_file}")
    assert resolve_pin(both, "explicit") == "explicit"
    assert resolve_pin(both, None) == "from-uri"
    assert resolve_pin(parse_pkcs11_uri("pkcs11:token=t"), None) is None
    assert resolve_pin(parse_pkcs11_uri("pkcs11:token=t"), "") == ""


def test_pin_source_reads_the_first_line(tmp_path: Path) -> None:
    (tmp_path / "pin").write_text("1234\nsecond line\n")
    (tmp_path / "crlf").write_bytes(b"5678\r\n")
    (tmp_path / "bare").write_text("9999")
    (tmp_path / "my pin").write_text("spaced\n")
    cases = {
        f"file:{tmp_path}/pin": "1234",
        f"file://{tmp_path}/pin": "1234",
        f"file://localhost{tmp_path}/pin": "1234",
        f"{tmp_path}/crlf": "5678",
        f"file:{tmp_path}/bare": "9999",
        f"file:{tmp_path}/my%2520pin": "spaced",  # file: URI's own %20, encoded once more
        f"file:{tmp_path}/my%20pin": "spaced",
    }
    for source, pin in cases.items():
        assert resolve_pin(parse_pkcs11_uri(f"pkcs11:?pin-source={source}"), None) == pin


@pytest.mark.parametrize(("source", "message"), [
    ("relative/pin", "give a file: URI or an absolute path"),
    ("file:relative", "give a file: URI or an absolute path"),
    ("file://example.org/etc/pin", "only local files"),
    ("|/usr/bin/get-pin", "give a file: URI or an absolute path"),
    ("/nonexistent/pin", "No such file"),
])
def test_pin_source_errors(source: str, message: str) -> None:
    uri = parse_pkcs11_uri(f"pkcs11:?pin-source={source.replace('|', '%7C')}")
    with pytest.raises(UriError, match="pin-source") as caught:
        resolve_pin(uri, None)
    assert message in str(caught.value)


def test_importing_idm_does_not_load_python_pkcs11() -> None:
    probe = ("import sys, idm, idm.pkcs11_uri, idm.pkcs11_signer; "
             "print('pkcs11' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "False"


# --- the signer, against SoftHSM2 in a child process --------------------------------

def _run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    return done.stdout


def _pkcs11_tool(env: dict[str, str], *arguments: str) -> str:
    return _run(["pkcs11-tool", "--module", str(SOFTHSM), "--token-label", "t1", "--login",
                 "--pin", PIN, *arguments], env)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fresh SoftHSM2 store: token t1 (with keys pkcs11-tool made) and two tokens both
    labelled twin."""
    for tool in ("softhsm2-util", "pkcs11-tool"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed")
    if not SOFTHSM.exists():
        pytest.fail(f"{SOFTHSM} is missing (apt-get install softhsm2)")
    base = tmp_path_factory.mktemp("idm-softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label in ("t1", "twin", "twin"):
        _run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN,
              "--pin", PIN], env)
    for label, key_id, key_type in (("ext-ec", "0e", "EC:prime256v1"),
                                    ("dup", "d1", "EC:prime256v1"),
                                    ("dup", "d2", "EC:prime256v1"),
                                    ("ec521", "52", "EC:secp521r1")):
        _pkcs11_tool(env, "--keypairgen", "--key-type", key_type, "--label", label,
                     "--id", key_id)
    pin_file = base / "user.pin"
    pin_file.write_text(PIN + "\n")
    return {"base": base, "conf": conf, "env": env, "pin_file": pin_file}


def _host(softhsm: dict[str, Any], phase: str) -> dict[str, Any]:
    spec = {"phase": phase, "module": str(SOFTHSM), "conf": str(softhsm["conf"]),
            "pin": PIN, "wrong_pin": WRONG_PIN, "pin_file": str(softhsm["pin_file"])}
    # Without SOFTHSM2_CONF: the signer's `environment` argument must supply it.
    env = {name: value for name, value in os.environ.items() if name != "SOFTHSM2_CONF"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(HOST), json.dumps(spec)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _listing(env: dict[str, str], kind: str) -> dict[str, str]:
    """pkcs11-tool's view of the privkey/pubkey objects: label -> its description block."""
    blocks: dict[str, str] = {}
    text = _pkcs11_tool(env, "--list-objects", "--type", kind)
    heading = "Private Key Object" if kind == "privkey" else "Public Key Object"
    for block in text.split(heading)[1:]:
        for line in block.splitlines():
            if line.strip().startswith("label:"):
                blocks[line.split(":", 1)[1].strip()] = block
    return blocks


GENERATED = {"ec256": "k-ec256", "ec384": "k-ec384", "rsa2048": "k-rsa"}


@pytest.fixture(scope="module")
def signed(softhsm: dict[str, Any]) -> dict[str, Any]:
    out = _host(softhsm, "main")
    # pkcs11-tool's independent view, taken before `fallback` changes the token: the
    # RSA key as SubjectPublicKeyInfo, EC keys as their CKA_EC_POINT (its --read-object
    # fails on P-384 public keys here: "cannot create EVP_PKEY").
    env = softhsm["env"]
    target = softhsm["base"] / "k-rsa.der"
    _pkcs11_tool(env, "--read-object", "--type", "pubkey", "--label", "k-rsa",
                 "-o", str(target))
    out["rsa_spki"] = target.read_bytes().hex()
    out["public_listing"] = _listing(env, "pubkey")
    out["private_listing"] = _listing(env, "privkey")
    return out


@pytest.fixture(scope="module")
def fallback(softhsm: dict[str, Any], signed: dict[str, Any]) -> dict[str, Any]:
    """k-ec384 loses its public-key object but gets a certificate (same label and id);
    k-rsa loses its public-key object and nothing else (the modulus is on the private
    key)."""
    env = softhsm["env"]
    public = serialization.load_der_public_key(bytes.fromhex(signed["keys"]["ec384"]["spki"]))
    issuer = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k-ec384")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(public)  # type: ignore[arg-type]
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + timedelta(days=1))
                   .sign(issuer, hashes.SHA256()))
    der = softhsm["base"] / "k-ec384.crt.der"
    der.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    _pkcs11_tool(env, "--write-object", str(der), "--type", "cert", "--label", "k-ec384",
                 "--id", "3834")
    for label in ("k-ec384", "k-rsa"):
        _pkcs11_tool(env, "--delete-object", "--type", "pubkey", "--label", label)
    return _host(softhsm, "fallback")


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _verify(alg: str, spki_hex: str, signature: bytes, data: bytes, *, der: bool) -> None:
    public = serialization.load_der_public_key(bytes.fromhex(spki_hex))
    if alg == "RS256":
        assert isinstance(public, rsa.RSAPublicKey)
        assert len(signature) == public.key_size // 8
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        return
    assert isinstance(public, ec.EllipticCurvePublicKey)
    size = {"ES256": 32, "ES384": 48}[alg]
    digest: hashes.HashAlgorithm = hashes.SHA256() if alg == "ES256" else hashes.SHA384()
    if der:
        r, s = decode_dss_signature(signature)
        assert encode_dss_signature(r, s) == signature  # strict DER, nothing trailing
    else:
        assert len(signature) == 2 * size  # RFC 7518 section 3.4: fixed-length r||s
        signature = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                         int.from_bytes(signature[size:], "big"))
    public.verify(signature, data, ec.ECDSA(digest))


KEYS = [("ec256", "ES256", ec.SECP256R1), ("ec384", "ES384", ec.SECP384R1),
        ("rsa2048", "RS256", None), ("ext-ec", "ES256", ec.SECP256R1)]


@pytest.mark.parametrize(("name", "alg", "curve"), KEYS, ids=[key[0] for key in KEYS])
def test_public_key_matches_the_token(signed: dict[str, Any], name: str, alg: str,
                                      curve: type[ec.EllipticCurve] | None) -> None:
    key = signed["keys"][name]
    assert key["alg"] == alg
    assert key["repr"] == f"Pkcs11Signer(token='t1', {alg})"
    public = serialization.load_der_public_key(bytes.fromhex(key["spki"]))
    if curve is None:
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
        assert key["spki"] == signed["rsa_spki"]
        return
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, curve)
    point = public.public_bytes(serialization.Encoding.X962,
                                serialization.PublicFormat.UncompressedPoint)
    block = signed["public_listing"][GENERATED.get(name, name)]
    listed = next(line.split(":", 1)[1].strip() for line in block.splitlines()
                  if "EC_POINT:" in line)
    assert listed == (bytes([0x04, len(point)]) + point).hex()  # DER OCTET STRING


@pytest.mark.parametrize(("name", "alg", "curve"), KEYS, ids=[key[0] for key in KEYS])
def test_jws_signatures_verify(signed: dict[str, Any], name: str, alg: str,
                               curve: type[ec.EllipticCurve] | None) -> None:
    key = signed["keys"][name]
    header, payload, signature = key["jwt"].split(".")
    assert json.loads(_b64url(header))["alg"] == alg
    signing_input = f"{header}.{payload}".encode()
    _verify(alg, key["spki"], _b64url(signature), signing_input, der=False)
    assert len(_b64url(signature)) == key["jws_length"]
    with pytest.raises(InvalidSignature):
        _verify(alg, key["spki"], _b64url(signature), signing_input + b"x", der=False)
    try:
        import jwt
    except ImportError:  # PyJWT is optional here: cryptography verified it above
        return
    public = serialization.load_der_public_key(bytes.fromhex(key["spki"]))
    claims = jwt.decode(key["jwt"], public, algorithms=[alg])  # type: ignore[arg-type]
    assert claims == {"sub": "spiffe://example.org/vm/vm1"}


@pytest.mark.parametrize(("name", "alg", "curve"), KEYS, ids=[key[0] for key in KEYS])
def test_x509_signatures_verify(signed: dict[str, Any], name: str, alg: str,
                                curve: type[ec.EllipticCurve] | None) -> None:
    key = signed["keys"][name]
    tbs = bytes.fromhex(key["tbs"])
    signature = bytes.fromhex(key["x509_signature"])
    _verify(alg, key["spki"], signature, tbs, der=True)
    with pytest.raises(InvalidSignature):
        _verify(alg, key["spki"], signature, tbs[1:], der=True)


def test_generated_keys_are_sensitive_never_extractable_signing_only(
        signed: dict[str, Any]) -> None:
    """EC keys only sign; RSA keys also decrypt (a hypervisor's RSA key opens the result
    containers sealed to it), and none can be extracted."""
    listing = signed["private_listing"]
    for label in GENERATED.values():
        block = listing[label]
        assert "never extractable" in block and "sensitive" in block and "local" in block
        usage = next(line for line in block.splitlines() if "Usage:" in line)
        granted = {u.strip() for u in usage.split(":", 1)[1].split(",")}
        expected = {"decrypt", "sign"} if "rsa" in label else {"sign"}
        assert granted == expected, usage
    derived = hashlib.sha1(b"k-ec256").digest()[:8].hex()
    assert f"ID:         {derived}" in listing["k-ec256"]
    assert "ID:         3834" in listing["k-ec384"]


def test_public_half_from_certificate_or_private_key(signed: dict[str, Any],
                                                     fallback: dict[str, Any]) -> None:
    for name, alg in (("ec384", "ES384"), ("rsa2048", "RS256")):
        key = fallback["keys"][name]
        assert key["spki"] == signed["keys"][name]["spki"]
        header, payload, signature = key["jwt"].split(".")
        _verify(alg, key["spki"], _b64url(signature), f"{header}.{payload}".encode(),
                der=False)
        _verify(alg, key["spki"], bytes.fromhex(key["x509_signature"]),
                bytes.fromhex(key["tbs"]), der=True)


def _error(signed: dict[str, Any], name: str, kind: str) -> str:
    record = signed["errors"][name]
    assert record["type"] == kind, record
    assert "SignerError" in record["bases"]
    message: str = record["message"]
    assert PIN not in message and WRONG_PIN not in message
    return message


def test_wrong_pin_is_refused_and_not_echoed(signed: dict[str, Any]) -> None:
    assert "rejected the PIN: wrong PIN" in _error(signed, "wrong_pin", "PinRejected")
    assert "wrong PIN" in _error(signed, "generate_wrong_pin", "PinRejected")
    assert "different PIN" in _error(signed, "wrong_pin_while_logged_in", "PinRejected")


def test_unknown_key_is_not_found(signed: dict[str, Any]) -> None:
    assert "no private key with label 'nope' in token 't1'" in \
        _error(signed, "unknown_object", "KeyNotFound")
    assert "id ff" in _error(signed, "unknown_id", "KeyNotFound")
    assert "no PIN was given" in _error(signed, "no_pin", "KeyNotFound")
    assert "type 'cert'" in _error(signed, "type_cert", "KeyNotFound")


def test_several_keys_or_an_odd_curve_are_refused(signed: dict[str, Any]) -> None:
    assert "2 private keys match label 'dup'" in _error(signed, "key_ambiguous",
                                                         "KeyAmbiguous")
    assert "other than P-256 and P-384" in _error(signed, "unsupported_curve",
                                                  "UnsupportedKey")


def test_token_must_match_exactly_once(signed: dict[str, Any]) -> None:
    missing = _error(signed, "token_missing", "TokenNotFound")
    assert "matches token='nope'" in missing and "'t1'" in missing
    assert "2 tokens" in _error(signed, "token_ambiguous", "TokenAmbiguous")


def test_module_and_environment_problems(signed: dict[str, Any]) -> None:
    assert "/nonexistent/libnope.so" in _error(signed, "module_missing", "ModuleLoadError")
    assert "already loaded in this process" in _error(signed, "environment_changed",
                                                      "ModuleLoadError")


def test_generating_over_an_existing_key_is_refused(signed: dict[str, Any]) -> None:
    assert "label 'k-ec256'" in _error(signed, "exists_label", "KeyExists")
    assert "id 3834" in _error(signed, "exists_id", "KeyExists")
    assert "object=<label>" in _error(signed, "generate_no_object", "SignerError")
    assert "ec521" in _error(signed, "generate_bad_kind", "UnsupportedKey")


def test_signers_on_one_token_share_the_login(signed: dict[str, Any]) -> None:
    assert signed["shared_login"] == "ok"
    assert "closed" in _error(signed, "closed", "SignerError")


LATE_TOKEN_SCRIPT = """
import json, subprocess, sys
from pathlib import Path
from idm.pkcs11_signer import Pkcs11Signer, _library
from idm.pkcs11_uri import parse_pkcs11_uri

module, conf, pin = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
environment = {"SOFTHSM2_CONF": conf}
_library(module, environment)  # C_Initialize: the token "late" does not exist yet
env = {"SOFTHSM2_CONF": conf, "PATH": "/usr/bin:/bin"}
for command in (
        ["softhsm2-util", "--init-token", "--free", "--label", "late", "--so-pin", "so-pin-1",
         "--pin", pin],
        ["pkcs11-tool", "--module", str(module), "--token-label", "late", "--login", "--pin",
         pin, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "k", "--id", "71"]):
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)
signer = Pkcs11Signer(module, parse_pkcs11_uri("pkcs11:token=late;object=k"), pin,
                      environment)
print(json.dumps({"signature": signer.sign_x509(b"late token").hex()}))
"""


def test_a_token_missed_at_initialization_is_found_again(softhsm: dict[str, Any]) -> None:
    """SoftHSM2 reads its tokens once, in C_Initialize; a token missing then (made later,
    or being rewritten by another process's login at that moment) is found by
    initializing the library anew."""
    done = subprocess.run([sys.executable, "-c", LATE_TOKEN_SCRIPT, str(SOFTHSM),
                           str(softhsm["conf"]), PIN],
                          env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    signature = bytes.fromhex(json.loads(done.stdout)["signature"])
    assert len(signature) > 60  # a DER ECDSA signature made inside token "late"
