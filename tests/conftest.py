"""Shared fixtures: one sandbox (a real SoftHSM2 token behind our module) per test run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11grid.sandbox import load_env

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MODULE = ROOT / "build" / "libp11grid.so"


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if not MODULE.exists():
        pytest.fail(f"{MODULE} is missing: run `make install` first")
    directory = tmp_path_factory.mktemp("sandbox") / "world"
    p11grid = str(VENV_BIN / "p11grid")
    subprocess.run([p11grid, "sandbox", "up", str(directory)], check=True,
                   capture_output=True, text=True)
    env = load_env(directory / "env")
    yield env
    subprocess.run([p11grid, "sandbox", "down", str(directory)], check=False,
                   capture_output=True)


@pytest.fixture(scope="session")
def sandbox_environ(sandbox: dict[str, str]) -> dict[str, str]:
    """os.environ plus the sandbox's variables, for child processes."""
    return {**os.environ, **sandbox}


# Keys beyond the sandbox's two, made inside the token before our module first looks.
EXTRA_KEYS = (("t-rsa3072", "11", "rsa:3072"), ("t-ec384", "12", "EC:secp384r1"))


@pytest.fixture(scope="session")
def p11lib(sandbox: dict[str, str], sandbox_environ: dict[str, str]):  # type: ignore[no-untyped-def]
    """python-pkcs11 loading libp11grid.so inside this test process."""
    import pkcs11

    for label, key_id, key_type in EXTRA_KEYS:
        subprocess.run(
            ["pkcs11-tool", "--module", sandbox["P11GRID_DIRECT_MODULE"], "--token-label",
             sandbox["P11GRID_DIRECT_TOKEN"], "--login", "--pin", sandbox["P11GRID_PIN"],
             "--keypairgen", "--key-type", key_type, "--label", label, "--id", key_id,
             "--usage-sign", "--usage-decrypt"],
            check=True, capture_output=True, env=sandbox_environ)
    os.environ["P11GRID_CONF"] = sandbox["P11GRID_CONF"]
    return pkcs11.lib(sandbox["P11GRID_MODULE"])


def grid_tokens(sandbox_environ: dict[str, str]) -> dict[str, str]:
    """Fresh tokens for one `authorize` at the sandbox's grid (an access token is good for
    one authorization), made by the module's gate in a child process."""
    import json

    result = subprocess.run([sys.executable, str(ROOT / "tests" / "gate_host.py")],
                            env=sandbox_environ, capture_output=True, text=True, timeout=60,
                            check=True)
    return dict(json.loads(result.stdout))
