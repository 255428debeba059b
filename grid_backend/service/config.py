"""The grid service's configuration (`p11grid grid serve --config FILE`), TOML:

    [grid]
    listen = "127.0.0.1:7443"        # host:port; 127.0.0.1 unless you mean otherwise
    certificate = "/etc/p11grid/grid.pem"   # the service's TLS certificate chain
    key = "/etc/p11grid/grid.key"
    client_ca = "/etc/p11grid/ca.pem"       # callers' certificates must chain to it
    registry = "/var/lib/p11grid/registry.sqlite"   # or postgresql://USER@HOST/DB?...
    node = "n1"                              # this grid node's name (default ""): it hosts
                                             # the registry's placements on that node
    audit_log = "/var/log/p11grid/audit.log" # one JSON line per operation; omit: syslog
    audit_to_registry = true                 # also rows in the registry's audit table;
                                             # default: true on PostgreSQL, false on SQLite
    log_file = "/var/log/p11grid/grid.log"   # omit: syslog, else stderr
    pid_file = "/run/p11grid/grid.pid"       # optional
    max_connections = 256
    idle_timeout = 600                       # seconds a quiet connection is kept
    metrics = "127.0.0.1:9464"               # optional: Prometheus endpoint (/metrics)

    [identity]                               # optional: the three-element check (issue 4)
    sp = "spiffe://example.org/sp/grid"      # this SP: the audience tokens must name
    ca_dir = "/var/lib/p11grid/ca"           # the IAM root CA (ca.pem, crl.pem)
    idp_issuer = "https://127.0.0.1:8443"    # the OpenID provider access tokens come from
    idp_jwks = "/etc/p11grid/idp-jwks.json"  # its signing keys (a JWKS file)
    max_token_lifetime = 86400               # seconds; longer VM/APP tokens are refused
    result_authority_key = "/etc/p11grid/grid-authority.key"  # optional: seal results in
    result_header = "rsa-oaep-sha256"        # containers (DESIGN.md 4) for callers asking

    [racs]                                   # optional: the RACS server of the grid
    listen = "127.0.0.1:7777"
    certificate = ".../racs.pem"
    key = ".../racs.key"
    client_ca = ".../ca.pem"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid_backend.endpoints import parse_endpoint


class GridConfigError(Exception):
    """The grid config is missing or wrong; the message names the file and key."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, where: str) -> Endpoint:
        try:
            return cls(*parse_endpoint(text))
        except ValueError as exc:
            raise GridConfigError(f"{where}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    certificate: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class RacsSettings:
    listen: Endpoint
    tls: TlsFiles


@dataclass(frozen=True)
class IdentitySettings:
    sp: str
    ca_dir: Path
    idp_issuer: str
    idp_jwks: Path
    max_token_lifetime: float
    result_authority_key: Path | None = None  # EC P-256 or RSA key that signs containers
    result_header: str = "rsa-oaep-sha256"


@dataclass(frozen=True)
class GridConfig:
    path: Path
    listen: Endpoint
    tls: TlsFiles
    registry: Path | str  # a SQLite file, or a postgresql:// URL (docs/registry.md)
    audit_log: Path | None
    log_file: Path | None
    pid_file: Path | None
    max_connections: int
    idle_timeout: float
    racs: RacsSettings | None
    identity: IdentitySettings | None = None
    metrics: Endpoint | None = None
    node: str = ""
    # Audit rows in the registry too (docs/registry.md): what several nodes share; they
    # cost the service's one interpreter time, ~20 % of ECDSA throughput at full load.
    audit_to_registry: bool = False


def _registry(table: dict[str, Any], where: str) -> Path | str:
    value = table.get("registry")
    if isinstance(value, str) and value.startswith(("postgresql://", "postgres://")):
        return value
    if not isinstance(value, str) or not value.startswith("/"):
        raise GridConfigError(f"{where}: registry must be an absolute path (SQLite) or a "
                              "postgresql:// URL")
    return Path(value)


def _path(table: dict[str, Any], key: str, where: str, required: bool = True) -> Path | None:
    value = table.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise GridConfigError(f"{where}: {key} must be an absolute path")
    return Path(value)


def _tls(table: dict[str, Any], where: str) -> TlsFiles:
    files = [_path(table, k, where) for k in ("certificate", "key", "client_ca")]
    return TlsFiles(*files)  # type: ignore[arg-type]


def load(path: Path) -> GridConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GridConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise GridConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"grid", "racs", "identity"}
    if unknown:
        raise GridConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    grid = data.get("grid")
    if not isinstance(grid, dict):
        raise GridConfigError(f"{path}: a [grid] table is needed")
    where = f"{path} [grid]"
    known = {"listen", "certificate", "key", "client_ca", "registry", "audit_log", "log_file",
             "pid_file", "max_connections", "idle_timeout", "metrics", "node",
             "audit_to_registry"}
    if set(grid) - known:
        raise GridConfigError(f"{where}: unknown key(s) {', '.join(sorted(set(grid) - known))}")
    racs = None
    if "racs" in data:
        table = data["racs"]
        racs = RacsSettings(Endpoint.parse(str(table.get("listen", "127.0.0.1:7777")),
                                           f"{path} [racs]"), _tls(table, f"{path} [racs]"))
    max_connections = grid.get("max_connections", 256)
    idle_timeout = grid.get("idle_timeout", 600)
    if not isinstance(max_connections, int) or max_connections < 1:
        raise GridConfigError(f"{where}: max_connections must be a positive integer")
    if not isinstance(idle_timeout, (int, float)) or idle_timeout <= 0:
        raise GridConfigError(f"{where}: idle_timeout must be a positive number of seconds")
    node = grid.get("node", "")
    if not isinstance(node, str):
        raise GridConfigError(f"{where}: node must be a string (this grid node's name)")
    registry = _registry(grid, where)
    audit_to_registry = grid.get("audit_to_registry", isinstance(registry, str))
    if not isinstance(audit_to_registry, bool):
        raise GridConfigError(f"{where}: audit_to_registry must be true or false")
    return GridConfig(
        path=path,
        listen=Endpoint.parse(str(grid.get("listen", "127.0.0.1:7443")), where),
        tls=_tls(grid, where),
        registry=registry,
        audit_log=_path(grid, "audit_log", where, required=False),
        log_file=_path(grid, "log_file", where, required=False),
        pid_file=_path(grid, "pid_file", where, required=False),
        max_connections=max_connections,
        idle_timeout=float(idle_timeout),
        racs=racs,
        identity=_identity(data["identity"], f"{path} [identity]") if "identity" in data
        else None,
        metrics=Endpoint.parse(str(grid["metrics"]), where) if "metrics" in grid else None,
        node=node,
        audit_to_registry=audit_to_registry,
    )


def _identity(table: Any, where: str) -> IdentitySettings:
    if not isinstance(table, dict):
        raise GridConfigError(f"{where} must be a table")
    known = {"sp", "ca_dir", "idp_issuer", "idp_jwks", "max_token_lifetime",
             "result_authority_key", "result_header"}
    if set(table) - known:
        raise GridConfigError(f"{where}: unknown key(s) {', '.join(sorted(set(table) - known))}")
    sp = table.get("sp")
    if not isinstance(sp, str) or not sp.startswith("spiffe://"):
        raise GridConfigError(f"{where}: sp must be this SP's spiffe:// identity")
    issuer = table.get("idp_issuer")
    if not isinstance(issuer, str) or not issuer.startswith("https://"):
        raise GridConfigError(f"{where}: idp_issuer must be the OpenID provider's https URL")
    lifetime = table.get("max_token_lifetime", 86400)
    if not isinstance(lifetime, (int, float)) or lifetime <= 0:
        raise GridConfigError(f"{where}: max_token_lifetime must be a positive number of "
                              "seconds")
    header = table.get("result_header", "rsa-oaep-sha256")
    if header not in ("rsa-oaep-sha256", "rsa-oaep-sha1"):
        raise GridConfigError(f"{where}: result_header must be rsa-oaep-sha256 or "
                              "rsa-oaep-sha1")
    return IdentitySettings(sp=sp, ca_dir=_path(table, "ca_dir", where),  # type: ignore[arg-type]
                            idp_issuer=issuer,
                            idp_jwks=_path(table, "idp_jwks", where),  # type: ignore[arg-type]
                            max_token_lifetime=float(lifetime),
                            result_authority_key=_path(table, "result_authority_key", where,
                                                       required=False),
                            result_header=str(header))
