"""Bad input and calls out of order, through the C entry points, each in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.abi_host import SCENARIOS

HOST = Path(__file__).resolve().parent / "abi_host.py"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenario(scenario: str, sandbox_environ: dict[str, str], tmp_path: Path) -> None:
    environ = {**sandbox_environ, "BROKEN_CONF": str(tmp_path / "broken.toml")}
    result = subprocess.run([sys.executable, str(HOST), scenario], env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
