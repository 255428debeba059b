"""Ready-to-use configuration for the programs that load the module: an OpenSSL config
for the libp11 engine, an nginx server, and a p11-kit module file (so that p11-kit,
GnuTLS's p11tool and NSS-based programs find it). `p11grid config openssl|nginx|p11kit`
prints them; the sandbox writes its OpenSSL configs with the same function.
"""

from __future__ import annotations

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
