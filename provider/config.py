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
class ModuleConfig:
    path: Path
    backend: str
    log_file: str | None
    log_level: str
    secure_elements: tuple[SecureElementConfig, ...]
    grid: GridConfig | None = None


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
    _no_unknown(data, {"module", "secure_element", "grid"}, where)
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
    labels = [e.label for e in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: secure_element labels must be unique")
    return ModuleConfig(path=path, backend=backend, log_file=log_file, log_level=log_level,
                        secure_elements=parsed, grid=grid)


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


def load() -> ModuleConfig:
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"no module config at {path} (set P11GRID_CONF)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the module config {path}: {exc}") from exc
    return parse(text, path)
