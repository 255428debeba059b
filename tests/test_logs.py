"""The module log tells an operator why a call failed, and never holds a PIN."""

from __future__ import annotations

import subprocess
from pathlib import Path


def test_refusal_is_logged_without_the_pin(sandbox: dict[str, str],
                                           sandbox_environ: dict[str, str]) -> None:
    log = Path(sandbox["P11GRID_SANDBOX"]) / "p11grid.log"
    wrong_pin = "987654321098"
    for pin in (wrong_pin, sandbox["P11GRID_PIN"]):
        subprocess.run(["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"], "--login",
                        "--pin", pin, "--list-objects"], env=sandbox_environ,
                       capture_output=True, timeout=60)
    text = log.read_text()
    assert "C_Login -> CKR_PIN_INCORRECT" in text
    assert "user logged in" in text
    assert wrong_pin not in text and sandbox["P11GRID_PIN"] not in text
