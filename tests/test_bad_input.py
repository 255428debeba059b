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
    if scenario == "broken_config" and not Path("/dev/log").exists():
        # Without a config there is no log file: the reason goes to syslog, else stderr.
        for reason in ("not valid TOML", "backend must be one of", "unknown key(s) colour",
                       "no module config at", "must be an absolute path"):
            assert reason in result.stderr, result.stderr[-3000:]
