"""Ready-to-use configuration for the programs that load the module: an OpenSSL config
for the libp11 engine, an OpenSSL 3 config for pkcs11-provider (Debian 13 on) with the PEM
file that names a key in a token for programs that only read key files, an nginx server,
and a p11-kit module file (so that p11-kit, GnuTLS's p11tool and NSS-based programs find
it). `p11grid config openssl [--provider]|provider-key|nginx|p11kit` prints them; the
sandbox writes its OpenSSL configs with the same functions.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

# nginx clears its workers' environment: the module's own variables must be passed on.
NGINX_PASSED_VARIABLES = ("P11GRID_CONF", "OPENSSL_CONF", "SOFTHSM2_CONF")


def openssl_quote(value: str) -> str:
    """A value for an OpenSSL config file: quoted, with its own quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def openssl_engine_conf(engine: Path, module: Path, pin: str | None, comment: str) -> str:
    """An OpenSSL config loading the libp11 engine on `module`.

    It names no providers section, so OpenSSL still loads its default provider by itself
    and `openssl req/x509/s_client` work as usual; the system openssl.cnf is not included
    because its own `openssl_init` section would clash with ours.
    """
    lines = [
        f"# {comment}",
        "openssl_conf = openssl_init",
        "",
        "[openssl_init]",
        "engines = engine_section",
        "",
        "[engine_section]",
        "pkcs11 = pkcs11_section",
        "",
        "[pkcs11_section]",
        "engine_id = pkcs11",
        f"dynamic_path = {openssl_quote(str(engine))}",
        f"MODULE_PATH = {openssl_quote(str(module))}",
    ]
    if pin is not None:
        lines.append(f"PIN = {openssl_quote(pin)}")
    lines += ["# nginx looks the engine up by id: it must be initialised when the config loads.",
              "init = 1", ""]
    return "\n".join(lines)


# --- pkcs11-provider (OpenSSL 3 providers; packaged from Debian 13 on) -----------------

PKCS11_PROVIDER_PACKAGE = "pkcs11-provider"
PKCS11_PROVIDER_FIRST_DEBIAN = 13
DEBIAN_VERSION_FILE = Path("/etc/debian_version")
OPENSSL_TIMEOUT_SECONDS = 30
# The PEM wrapper pkcs11-provider decodes (its src/pk11_uri.h): DER of
# SEQUENCE { desc VisibleString, uri UTF8String } under this label, with this desc.
PROVIDER_URI_PEM_LABEL = "PKCS#11 PROVIDER URI"
PROVIDER_URI_DESCRIPTION = "PKCS#11 Provider URI v1.0"


class ProviderKeyError(ValueError):
    """A key URI that cannot go into a provider key file; the message says why."""


def debian_major(version_file: Path = DEBIAN_VERSION_FILE) -> int | None:
    """Debian's major version from /etc/debian_version (None: not Debian, or testing/sid
    without a number)."""
    try:
        text = version_file.read_text().strip()
    except OSError:
        return None
    match = re.match(r"(\d+)", text)
    return int(match.group(1)) if match else None


def _openssl_modules_dir() -> Path | None:
    """OpenSSL's provider directory, as the `openssl` on PATH reports it."""
    try:
        result = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True,
                                timeout=OPENSSL_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'MODULESDIR:\s*"([^"]+)"', result.stdout)
    return Path(match.group(1)) if match else None


def find_pkcs11_provider() -> Path | None:
    """pkcs11-provider's OpenSSL module (`pkcs11.so` in OpenSSL's MODULESDIR), if installed."""
    directory = _openssl_modules_dir()
    if directory is not None and (directory / "pkcs11.so").is_file():
        return directory / "pkcs11.so"
    try:
        listing = subprocess.run(["dpkg", "-L", PKCS11_PROVIDER_PACKAGE], capture_output=True,
                                 text=True, timeout=OPENSSL_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in listing.stdout.splitlines() if listing.returncode == 0 else []:
        path = Path(line.strip())
        if path.name == "pkcs11.so" and path.parent.name == "ossl-modules" and path.is_file():
            return path
    return None


def pkcs11_provider_missing_reason(major: int | None = None) -> str:
    """Why pkcs11-provider is not there, and what to do, in one line."""
    major = debian_major() if major is None else major
    if major is not None and major < PKCS11_PROVIDER_FIRST_DEBIAN:
        return (f"pkcs11-provider is not packaged on Debian {major} (it is from Debian "
                f"{PKCS11_PROVIDER_FIRST_DEBIAN} on); use the libp11 engine there "
                "(p11grid config openssl)")
    if major is not None:
        return (f"pkcs11-provider is not installed on Debian {major}: run `make install` "
                f"(apt-get install {PKCS11_PROVIDER_PACKAGE})")
    return ("pkcs11-provider (pkcs11.so in OpenSSL's MODULESDIR, `openssl version -m`) was "
            "not found on this system")


def openssl_provider_conf(provider: Path, module: Path, pin: str | None,
                          pin_file: Path | None, comment: str,
                          quirks: Sequence[str] = ()) -> str:
    """An OpenSSL 3 config loading pkcs11-provider on `module` next to the default provider.

    Everything but the keys in the token stays with the default provider
    (`default_properties = ?provider=default`): hashes, and the TLS of the module's own
    connections to the grid and the OpenID provider, which run inside the same process.
    The module is loaded at the first key that names it, never while OpenSSL reads this
    file. The PIN is given in the file or, better, as a file of its own (`file:PATH`,
    the PIN on its first line). `quirks`: pkcs11-provider's workarounds for a module,
    e.g. `no-deinit` for SoftHSM2, which crashes at process exit when the provider
    finalizes it after SoftHSM2's own C++ destructors ran (SoftHSMv2 issues #729, #780).
    """
    if pin is not None and pin_file is not None:
        raise ValueError("give the PIN or a PIN file, not both")
    lines = [
        f"# {comment}",
        "openssl_conf = openssl_init",
        "",
        "[openssl_init]",
        "providers = provider_section",
        "alg_section = algorithm_section",
        "",
        "[provider_section]",
        "default = default_section",
        "pkcs11 = pkcs11_section",
        "",
        "[default_section]",
        "activate = 1",
        "",
        "[algorithm_section]",
        "# The token serves its own keys only; OpenSSL's default provider does the rest.",
        "default_properties = ?provider=default",
        "",
        "[pkcs11_section]",
        f"module = {openssl_quote(str(provider))}",
        f"pkcs11-module-path = {openssl_quote(str(module))}",
    ]
    if pin is not None:
        lines.append(f"pkcs11-module-token-pin = {openssl_quote(pin)}")
    elif pin_file is not None:
        lines.append(f"pkcs11-module-token-pin = {openssl_quote('file:' + str(pin_file))}")
    if quirks:
        lines.append(f"pkcs11-module-quirks = {' '.join(quirks)}")
    lines += ["activate = 1", ""]
    return "\n".join(lines)


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _der(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def provider_key_uri(uri: str) -> str:
    """The URI as a provider key file holds it: a private key, no PIN, no module path."""
    if not uri.startswith("pkcs11:"):
        raise ProviderKeyError(f"{uri!r} is not a PKCS#11 URI (pkcs11:...)")
    path, _, query = uri.partition("?")
    attributes = [a for a in path[len("pkcs11:"):].split(";") if a]
    kinds = [a.split("=", 1)[1] for a in attributes if a.startswith("type=")]
    if any(kind != "private" for kind in kinds):
        raise ProviderKeyError("the URI names a type other than type=private: a key file "
                               "names the private key")
    if not any(a.startswith(("object=", "id=")) for a in attributes):
        raise ProviderKeyError("the URI names no object= or id=: it must name one key")
    if not kinds:
        attributes.append("type=private")
    for item in query.split("&") if query else []:
        name = item.split("=", 1)[0]
        if name == "pin-value":
            raise ProviderKeyError("the URI holds a PIN (pin-value): a key file is not "
                                   "encrypted; give the PIN in the provider's config "
                                   "(pkcs11-module-token-pin) instead")
    # module-path, module-name and pin-source are the caller's business, not the file's:
    # the provider's config names the module and the PIN.
    return "pkcs11:" + ";".join(attributes)


def provider_key_pem(uri: str) -> str:
    """A PEM file naming a key in a token, for programs that only load key files (Python's
    `ssl.SSLContext.load_cert_chain`, `openssl -key FILE`): pkcs11-provider's decoder turns
    it into the key, when the provider is loaded (the file holds no secret)."""
    der = _der(0x30, _der(0x1A, PROVIDER_URI_DESCRIPTION.encode("ascii"))
               + _der(0x0C, provider_key_uri(uri).encode("utf-8")))
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {PROVIDER_URI_PEM_LABEL}-----", *lines,
                      f"-----END {PROVIDER_URI_PEM_LABEL}-----", ""])


def nginx_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nginx_server(listen: str, certificate: Path, key_uri: str, server_name: str) -> str:
    """One TLS server whose private key stays in the secure element (engine:pkcs11:URI)."""
    return "\n".join([
        "server {",
        f"    listen {listen} ssl;",
        f"    server_name {server_name};",
        f"    ssl_certificate {nginx_quote(str(certificate))};",
        f"    ssl_certificate_key {nginx_quote('engine:pkcs11:' + key_uri)};",
        "    ssl_protocols TLSv1.2 TLSv1.3;",
        "    location / {",
        "        return 200 \"served with a key held in the grid\\n\";",
        "    }",
        "}",
        "",
    ])


def nginx_main_lines() -> str:
    """For nginx.conf's main context: what the workers must inherit."""
    return "".join(f"env {name};\n" for name in NGINX_PASSED_VARIABLES)


def p11kit_module(module: Path) -> str:
    """A p11-kit module file (`/etc/pkcs11/modules/p11grid.module`)."""
    return (
        "# p11grid: keys in a remote grid of secure elements (p11-kit module file)\n"
        f"module: {module}\n"
        "# not needed for the system to work, and never a source of trust anchors\n"
        "critical: no\n"
        "trust-policy: no\n"
    )


SERVICES = {
    "grid": ("p11grid grid service: secure elements behind mutual TLS",
             "grid serve --config {config}", "/etc/p11grid/grid.toml"),
    "idp": ("p11grid OpenID provider: hypervisors' proof of possession, token exchange",
            "idp serve --config {config}", "/etc/p11grid/idp.toml"),
}


def systemd_unit(service: str, p11grid: Path, config: Path | None) -> str:
    """A systemd unit for a long-running p11grid service ("grid" or "idp")."""
    description, command, default_config = SERVICES[service]
    arguments = command.format(config=config or default_config)
    return "\n".join([
        "[Unit]",
        f"Description={description}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={p11grid} {arguments}",
        # SIGTERM: the service stops accepting, finishes what it holds, and exits.
        "KillSignal=SIGTERM",
        "TimeoutStopSec=20",
        "Restart=on-failure",
        "RestartSec=2",
        "StateDirectory=p11grid",
        "LogsDirectory=p11grid",
        "RuntimeDirectory=p11grid",
        "UMask=0077",
        # It holds keys' PINs in memory and talks to tokens: keep the rest of the system
        # out of its reach.
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=read-only",
        "ProtectSystem=full",
        "ProtectKernelTunables=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
