"""The module's grid backend when the grid misbehaves, each fault provoked for real on a
sandbox of its own: restart, stall (SIGSTOP), gone, and failover between two endpoints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11grid.sandbox import load_env, record_process
from p11grid.sandbox_grid import free_port

HOST = Path(__file__).resolve().parent / "grid_host.py"
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 1.5  # the module's per-request deadline in these tests


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    directory = tmp_path_factory.mktemp("faults") / "world"
    subprocess.run([str(VENV_BIN / "p11grid"), "sandbox", "up", str(directory)], check=True,
                   capture_output=True)
    env = load_env(directory / "env")
    config = Path(env["P11GRID_CONF"])
    config.write_text(config.read_text().replace("timeout = 5.0", f"timeout = {TIMEOUT}"))
    yield env
    subprocess.run([str(VENV_BIN / "p11grid"), "sandbox", "down", str(directory)],
                   capture_output=True)


def _wait_for_state(pid: int, state: str) -> None:
    for _ in range(200):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:].split()[0] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never reached state {state}")


class Grid:
    """The sandbox's grid service process, which the tests stop and start themselves."""

    def __init__(self, env: dict[str, str], config: Path | None = None) -> None:
        self.env = env
        self.config = config or Path(env["P11GRID_GRID_CONF"])
        self.process: subprocess.Popen[bytes] | None = None

    def adopt_sandbox_process(self) -> int:
        return int(Path(self.env["P11GRID_GRID_PIDFILE"]).read_text())

    def start(self) -> None:
        port = int(re.search(r'listen = "127\.0\.0\.1:(\d+)"', self.config.read_text())[1])
        environ = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
        self.process = subprocess.Popen(
            [str(VENV_BIN / "p11grid"), "grid", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environ)
        if self.config == Path(self.env["P11GRID_GRID_CONF"]):
            # The sandbox's grid, restarted: `sandbox down` must stop this one now.
            record_process(Path(self.env["P11GRID_SANDBOX"]), "grid", self.process.pid)
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the grid did not come back")

    def stop(self, pid: int | None = None) -> None:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                if not Path(f"/proc/{pid}").exists() or \
                        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    return
                time.sleep(0.05)
            raise AssertionError(f"grid {pid} did not stop")
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class Application:
    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HOST)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready", self.errors()

    def errors(self) -> str:
        return self.process.stderr.read() if self.process.poll() is not None else ""  # type: ignore[union-attr]

    def do(self, command: str) -> tuple[str, float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().split()
        assert answer, self.errors()
        return " ".join(answer[:-1]), float(answer[-1])

    def close(self) -> None:
        if self.process.poll() is None:
            self.do_exit()

    def do_exit(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("exit\n")
        self.process.stdin.flush()
        self.process.wait(timeout=10)


def test_restart_stall_and_gone(world: dict[str, str]) -> None:
    grid = Grid(world)
    application = Application(world)
    try:
        assert application.do("sign")[0] == "ok"
        # Restarted: the next signature works, without restarting the application.
        grid.stop(grid.adopt_sandbox_process())
        grid.start()
        assert application.do("sign")[0] == "ok"
        assert application.do("find")[0] == "ok"  # answered from the module's cache
        # Stalled: refused within the deadline, then fine again once it runs.
        assert grid.process is not None
        os.kill(grid.process.pid, signal.SIGSTOP)
        _wait_for_state(grid.process.pid, "T")  # kill() returns before the process stops
        try:
            answer, took = application.do("sign")
            assert answer == "error DeviceError"
            assert took < TIMEOUT + 1.0, f"took {took} s with a {TIMEOUT} s deadline"
            assert application.do("find")[0] == "ok"  # the cache needs no grid
        finally:
            os.kill(grid.process.pid, signal.SIGCONT)
        assert application.do("sign")[0] == "ok"
        # Gone: CKR_DEVICE_REMOVED, quickly; back once the grid is back.
        grid.stop()
        answer, took = application.do("sign")
        assert answer == "error DeviceRemoved"
        assert took < TIMEOUT + 1.0
        grid.start()
        assert application.do("sign")[0] == "ok"
    finally:
        application.close()
        grid.stop()
        grid.start()  # leave the sandbox as it was, for `down` to stop (by pid file)


def test_failover_to_the_next_endpoint(world: dict[str, str], tmp_path: Path) -> None:
    # A second grid process on its own port, same registry and token.
    second_port = free_port()
    first_config = Path(world["P11GRID_GRID_CONF"])
    # Without the [racs] table: the first grid's RACS server holds that port.
    text = first_config.read_text().split("\n[racs]")[0]
    second_config = tmp_path / "grid-2.toml"
    second_config.write_text(re.sub(r'listen = "127\.0\.0\.1:\d+"',
                                    f'listen = "127.0.0.1:{second_port}"', text)
                             .replace("grid.pid", "grid-2.pid"))
    second = Grid(world, second_config)
    second.start()
    module_config = tmp_path / "p11grid.toml"
    module_config.write_text(Path(world["P11GRID_CONF"]).read_text().replace(
        f'endpoints = ["{world["P11GRID_GRID_ADDR"]}"]',
        f'endpoints = ["127.0.0.1:{free_port()}", "{world["P11GRID_GRID_ADDR"]}", '
        f'"127.0.0.1:{second_port}"]'))
    first = Grid(world)
    application = Application({**world, "P11GRID_CONF": str(module_config)})
    try:
        assert application.do("sign")[0] == "ok"  # a dead first endpoint is skipped
        first.stop(first.adopt_sandbox_process())
        assert application.do("sign")[0] == "ok"  # the second grid takes over
        assert application.do("sign")[0] == "ok"
    finally:
        application.close()
        second.stop()
        first.start()


def test_a_vm_certificate_revoked_in_the_crl_is_refused(world: dict[str, str]) -> None:
    """Last in this module (the revocation stays): `p11grid ca revoke` on the VM's TLS
    certificate, and the grid refuses the next authorization, naming the revocation."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(
        (Path(world["P11GRID_SANDBOX"]) / "grid" / "vm.pem").read_bytes())
    revoked = subprocess.run(
        [str(VENV_BIN / "p11grid"), "ca", "revoke", "--ca-dir", world["P11GRID_CA_DIR"],
         "--serial", f"{certificate.serial_number:x}", "--reason", "keyCompromise"],
        capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    refused = subprocess.run([sys.executable, str(HOST)], input="exit\n",
                             env={**os.environ, **world}, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0, "a revoked VM certificate still logged in"
    grid_log = (Path(world["P11GRID_SANDBOX"]) / "grid" / "grid.log").read_text()
    assert f"serial {certificate.serial_number:x}" in grid_log and "was revoked" in grid_log
