"""The module configuration: TOML at $P11GRID_CONF, else /etc/p11grid/p11grid.toml.

Never read from the current directory: a module runs inside other people's processes.
Unknown keys are errors, so a typo is reported instead of silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grid_backend.endpoints import parse_endpoint
from provider.constants import CKM
from provider.return_values import ConfigError

DEFAULT_PATH = Path("/etc/p11grid/p11grid.toml")
BACKENDS = ("local", "grid")
DRIVERS = ("pkcs11",)
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class SecureElementConfig:
    """One secure element, shown as one slot with one token."""

    label: str
    driver: str
    library: str
    token_label: str
    environment: dict[str, str] = field(default_factory=dict)
    # The element mechanisms the module may ask for; None: whatever the element lists.
    mechanisms: frozenset[int] | None = None
    seid: str = ""  # backend = "grid": the element's id at the grid (default: the label)


@dataclass(frozen=True)
class GridConfig:
    """backend = "grid": where the grid is and who this module is to it."""

    endpoints: tuple[tuple[str, int], ...]
    ca: str
    certificate: str
    key: str
    timeout: float
    spin_us: int = 1000


@dataclass(frozen=True)
class IdentityConfig:
    """backend = "grid" with `[identity]`: the tokens presented before a session opens
    (idm/gate.py). Paths are absolute; one of vm_token / vm, one of hv_key / hv_key_file."""

    audience: str
    ca: str
    idp: str
    hv_certificate: str
    crl: str | None = None
    vm_token: str | None = None
    vm: str | None = None
    hv_key: str | None = None
    hv_module: str | None = None
    hv_environment: dict[str, str] = field(default_factory=dict)
    hv_key_file: str | None = None
    max_token_lifetime: float = 86400.0
    result_authority: str | None = None  # results sealed by the grid (DESIGN.md 4)
    app_token: str | None = None  # an APP: its APP-Auth-Token, and the VM's identity
    vm_certificate: str | None = None  # (certificate and key file) that vouches for it
    vm_key_file: str | None = None


@dataclass(frozen=True)
class ModuleConfig:
    path: Path
    backend: str
    log_file: str | None
    log_level: str
    secure_elements: tuple[SecureElementConfig, ...]
    grid: GridConfig | None = None
    identity: IdentityConfig | None = None


def config_path() -> Path:
    chosen = os.environ.get("P11GRID_CONF")
    if chosen:
        path = Path(chosen)
        if not path.is_absolute():
            raise ConfigError(f"P11GRID_CONF must be an absolute path, not {chosen!r}")
        return path
    return DEFAULT_PATH


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return value


def _string(data: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value


def _no_unknown(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _secure_element(data: Any, where: str, backend: str) -> SecureElementConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    label = _string(data, "label", where)
    if len(label.encode()) > 32:
        raise ConfigError(f"{where}: label {label!r} is longer than 32 bytes")
    if backend == "grid":
        _no_unknown(data, {"label", "seid"}, where)
        return SecureElementConfig(label=label, driver="grid", library="", token_label="",
                                   seid=_string(data, "seid", where, label))
    _no_unknown(data, {"label", "driver", "library", "token_label", "environment",
                       "mechanisms"}, where)
    driver = _string(data, "driver", where, "pkcs11")
    if driver not in DRIVERS:
        raise ConfigError(f"{where}: driver must be one of {', '.join(DRIVERS)}")
    library = _string(data, "library", where)
    if not os.path.isabs(library):
        raise ConfigError(f"{where}: library must be an absolute path")
    environment = _table(data, "environment", where)
    for name, value in environment.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}: environment.{name} must be a string")
    return SecureElementConfig(
        label=label, driver=driver, library=library,
        token_label=_string(data, "token_label", where, label),
        environment=dict(environment),
        mechanisms=_mechanisms(data.get("mechanisms"), where),
    )


def _mechanisms(value: Any, where: str) -> frozenset[int] | None:
    """`mechanisms = ["RSA_X_509", "ECDSA"]`: names of CKM_* without the prefix."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: mechanisms must be a list of names such as \"ECDSA\"")
    unknown = [v for v in value if v not in CKM.__members__]
    if unknown:
        raise ConfigError(f"{where}: unknown mechanism(s) {', '.join(unknown)}; known: "
                          f"{', '.join(CKM.__members__)}")
    return frozenset(int(CKM[v]) for v in value)


def parse(text: str, path: Path) -> ModuleConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    where = str(path)
    _no_unknown(data, {"module", "secure_element", "grid", "identity"}, where)
    module = _table(data, "module", where)
    _no_unknown(module, {"backend", "log_file", "log_level"}, f"{where} [module]")
    backend = _string(module, "backend", f"{where} [module]", "local")
    if backend not in BACKENDS:
        raise ConfigError(f"{where} [module]: backend must be one of {', '.join(BACKENDS)}")
    log_file = module.get("log_file")
    if log_file is not None and (not isinstance(log_file, str) or not os.path.isabs(log_file)):
        raise ConfigError(f"{where} [module]: log_file must be an absolute path")
    log_level = _string(module, "log_level", f"{where} [module]", "info")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"{where} [module]: log_level must be one of {', '.join(LOG_LEVELS)}")
    elements = data.get("secure_element", [])
    # With the grid, no [[secure_element]] means: the slots are the elements the grid
    # lets this caller use, asked for at the first C_GetSlotList.
    if not isinstance(elements, list) or (not elements and backend != "grid"):
        raise ConfigError(f"{where}: at least one [[secure_element]] is needed")
    parsed = tuple(_secure_element(e, f"{where} [[secure_element]] #{i + 1}", backend)
                   for i, e in enumerate(elements))
    grid = _grid(data, f"{where} [grid]") if backend == "grid" else None
    if backend != "grid" and "grid" in data:
        raise ConfigError(f"{where}: a [grid] table needs backend = \"grid\"")
    if backend != "grid" and "identity" in data:
        raise ConfigError(f"{where}: an [identity] table needs backend = \"grid\"")
    identity = _identity(data, f"{where} [identity]") if "identity" in data else None
    labels = [e.label for e in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: secure_element labels must be unique")
    return ModuleConfig(path=path, backend=backend, log_file=log_file, log_level=log_level,
                        secure_elements=parsed, grid=grid, identity=identity)


def _grid(data: dict[str, Any], where: str) -> GridConfig:
    table = _table(data, "grid", where)
    _no_unknown(table, {"endpoints", "ca", "certificate", "key", "timeout", "spin_us"}, where)
    endpoints = table.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError(f"{where}: endpoints must be a list of \"host:port\"")
    parsed = []
    for endpoint in endpoints:
        try:
            parsed.append(parse_endpoint(endpoint))
        except ValueError as exc:
            raise ConfigError(f"{where}: endpoint {exc}") from None
    files = {}
    for key in ("ca", "certificate", "key"):
        value = _string(table, key, where)
        if not os.path.isabs(value):
            raise ConfigError(f"{where}: {key} must be an absolute path")
        files[key] = value
    timeout = table.get("timeout", 5.0)
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
        raise ConfigError(f"{where}: timeout must be a number of seconds in (0, 300]")
    spin_us = table.get("spin_us", 1000)
    if isinstance(spin_us, bool) or not isinstance(spin_us, int) or not 0 <= spin_us <= 5000:
        raise ConfigError(f"{where}: spin_us must be an integer of microseconds in [0, 5000]")
    return GridConfig(endpoints=tuple(parsed), timeout=float(timeout), spin_us=spin_us,
                      **files)


def _identity(data: dict[str, Any], where: str) -> IdentityConfig:
    table = _table(data, "identity", where)
    _no_unknown(table, {"audience", "ca", "crl", "idp", "hv_certificate", "vm_token", "vm",
                        "hv_key", "hv_module", "hv_environment", "hv_key_file",
                        "max_token_lifetime", "result_authority", "app_token",
                        "vm_certificate", "vm_key_file"}, where)
    paths: dict[str, str | None] = {}
    for key in ("ca", "hv_certificate", "crl", "vm_token", "hv_module", "hv_key_file",
                "result_authority", "app_token", "vm_certificate", "vm_key_file"):
        value = table.get(key)
        if value is None and key not in ("ca", "hv_certificate"):
            paths[key] = None
            continue
        if not isinstance(value, str) or not os.path.isabs(value):
            raise ConfigError(f"{where}: {key} must be an absolute path")
        paths[key] = value
    audience = _string(table, "audience", where)
    idp = _string(table, "idp", where)
    if not audience.startswith("spiffe://"):
        raise ConfigError(f"{where}: audience must be the grid SP's spiffe:// identity")
    if not idp.startswith("https://"):
        raise ConfigError(f"{where}: idp must be the OpenID provider's https:// issuer URL")
    vm = table.get("vm")
    if (paths["vm_token"] is None) == (vm is None):
        raise ConfigError(f"{where}: give vm_token (a VM-Auth-Token file: Option 2) or vm "
                          "(this VM's identity: the OpenID provider hands the token out)")
    hv_key = table.get("hv_key")
    if (hv_key is None) == (paths["hv_key_file"] is None):
        raise ConfigError(f"{where}: give hv_key (PKCS#11 URI: private_key_jwt) or "
                          "hv_key_file (tls_client_auth)")
    if hv_key is not None and paths["hv_module"] is None:
        raise ConfigError(f"{where}: hv_key needs hv_module (the PKCS#11 library holding it)")
    if paths["app_token"] is not None and (paths["vm_certificate"] is None
                                           or paths["vm_key_file"] is None):
        raise ConfigError(f"{where}: app_token needs vm_certificate and vm_key_file (the VM "
                          "vouches for the APP at the OpenID provider)")
    environment = _table(table, "hv_environment", where)
    if not all(isinstance(v, str) for v in environment.values()):
        raise ConfigError(f"{where}: hv_environment values must be strings")
    lifetime = table.get("max_token_lifetime", 86400)
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
        raise ConfigError(f"{where}: max_token_lifetime must be a positive number of seconds")
    return IdentityConfig(
        audience=audience, ca=str(paths["ca"]), idp=idp,
        hv_certificate=str(paths["hv_certificate"]), crl=paths["crl"],
        vm_token=paths["vm_token"], vm=str(vm) if vm is not None else None,
        hv_key=str(hv_key) if hv_key is not None else None, hv_module=paths["hv_module"],
        hv_environment=dict(environment), hv_key_file=paths["hv_key_file"],
        max_token_lifetime=float(lifetime), result_authority=paths["result_authority"],
        app_token=paths["app_token"], vm_certificate=paths["vm_certificate"],
        vm_key_file=paths["vm_key_file"])


def load() -> ModuleConfig:
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"no module config at {path} (set P11GRID_CONF)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the module config {path}: {exc}") from exc
    return parse(text, path)
