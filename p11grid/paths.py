"""Where things live: this checkout, our module, and the Debian packages the sandbox drives."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

# p11grid/ sits at the top of the checkout; never trust the current directory.
REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE_PATH = REPO_ROOT / "build" / "libp11grid.so"

SOFTHSM_CANDIDATES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
)
PKCS11_ENGINE_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"),
    Path("/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so"),
)
NGINX_BINARY = Path("/usr/sbin/nginx")


class MissingDependencyError(RuntimeError):
    """A system package the sandbox needs is not installed."""


def _package_files(package: str) -> list[Path]:
    try:
        listing = subprocess.run(
            ["dpkg", "-L", package], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    return [Path(line) for line in listing.stdout.splitlines() if line.strip()]


def _first_existing(candidates: Iterable[Path]) -> Path | None:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def softhsm_library() -> Path:
    """The SoftHSM2 PKCS#11 library: known paths first, then what dpkg says it installed."""
    found = _first_existing(SOFTHSM_CANDIDATES)
    if found is None:
        found = _first_existing(
            p for p in _package_files("libsofthsm2") if p.name == "libsofthsm2.so"
        )
    if found is None:
        raise MissingDependencyError(
            "libsofthsm2.so not found: install the Debian package softhsm2"
        )
    return found


def pkcs11_engine() -> Path:
    """The libp11 OpenSSL engine (package libengine-pkcs11-openssl)."""
    found = _first_existing(PKCS11_ENGINE_CANDIDATES)
    if found is None:
        found = _first_existing(
            p
            for p in _package_files("libengine-pkcs11-openssl")
            if p.name == "pkcs11.so" and p.parent.name.startswith("engines")
        )
    if found is None:
        raise MissingDependencyError(
            "the libp11 OpenSSL engine (engines-3/pkcs11.so) was not found: "
            "install the Debian package libengine-pkcs11-openssl"
        )
    return found


def softhsm_util() -> Path:
    for candidate in (Path("/usr/bin/softhsm2-util"), Path("/usr/local/bin/softhsm2-util")):
        if candidate.is_file():
            return candidate
    raise MissingDependencyError("softhsm2-util not found: install the Debian package softhsm2")


def nginx_binary() -> Path:
    if not NGINX_BINARY.is_file():
        raise MissingDependencyError(f"{NGINX_BINARY} not found: install the Debian package nginx")
    return NGINX_BINARY
