"""The module inside a C host started outside the virtualenv, and when Python cannot start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

HOSTS = Path(__file__).resolve().parent / "hosts"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("hosts") / "probe"
    subprocess.run(["cc", "-Wall", "-Wextra", "-Werror", "-I/usr/include/p11-kit-1",
                    str(HOSTS / "probe.c"), "-o", str(binary), "-ldl"], check=True)
    return binary


def run_probe(probe: Path, sandbox: dict[str, str], **extra: str) -> dict[str, list[int]]:
    # No VIRTUAL_ENV, no PYTHONPATH: only what the module recorded at build time.
    environ = {"PATH": CLEAN_PATH, **sandbox, **extra}
    result = subprocess.run([str(probe), sandbox["P11GRID_MODULE"]], env=environ,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    codes: dict[str, list[int]] = {}
    for line in result.stdout.splitlines():
        name, code = line.split()
        codes.setdefault(name, []).append(int(code, 16))
    return codes


def test_c_host_outside_the_virtualenv(probe: Path, sandbox: dict[str, str]) -> None:
    codes = run_probe(probe, sandbox)
    assert codes["C_GetInfo"] == [0x190, 0x0]  # CKR_CRYPTOKI_NOT_INITIALIZED, then CKR_OK
    assert codes["C_Initialize"] == [0x0]
    assert codes["C_GetSlotList"] == [0x0]
    assert codes["C_OpenSession"] == [0x0]
    assert codes["C_CreateObject"] == [0x54]  # CKR_FUNCTION_NOT_SUPPORTED
    assert codes["C_CloseSession"] == [0x0]
    assert codes["C_Finalize"] == [0x0]


def test_python_that_cannot_start_answers_general_error(probe: Path,
                                                        sandbox: dict[str, str]) -> None:
    """Our code is unimportable: cffi would answer 0 (CKR_OK); the C edge must not."""
    codes = run_probe(probe, sandbox, P11GRID_SITE_PACKAGES="/nonexistent")
    assert set(codes) >= {"C_GetInfo", "C_Initialize", "C_GetSlotList", "C_OpenSession",
                          "C_CreateObject", "C_Finalize"}
    assert all(code == [0x5] * len(code) for code in codes.values()), codes


def test_another_python_first_on_path_changes_nothing(probe: Path, sandbox: dict[str, str],
                                                       tmp_path: Path) -> None:
    """A host whose PATH starts with another Python (pyenv, a foreign virtualenv): the
    module's interpreter still uses the standard library it was built with."""
    import sys

    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (tmp_path / "bin").mkdir()
    impostor = tmp_path / "bin" / "python3"
    impostor.write_text("#!/bin/sh\nexit 1\n")
    impostor.chmod(0o755)
    stdlib = tmp_path / "lib" / version
    stdlib.mkdir(parents=True)
    (stdlib / "os.py").write_text("raise ImportError('the wrong standard library')\n")
    environ = {**sandbox, "PATH": f"{tmp_path / 'bin'}:{CLEAN_PATH}"}
    result = subprocess.run([str(probe), sandbox["P11GRID_MODULE"]], env=environ,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "C_Initialize 0x0" in result.stdout, result.stdout + result.stderr
    assert "C_OpenSession 0x0" in result.stdout, result.stdout + result.stderr
