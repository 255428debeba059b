"""Shared fixtures: one sandbox (a real SoftHSM2 token behind our module) per test run."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# PostgreSQL, for the registry's server backend ------------------------------------------

@dataclasses.dataclass(frozen=True)
class PostgresServer:
    """The test run's PostgreSQL server: TCP on 127.0.0.1 only, scram-sha-256 passwords;
    the superuser reaches it through the Unix socket in its private directory."""

    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    port: int
    user: str  # a login role, not a superuser; it owns the databases postgres_url makes
    password_file: Path  # its password, alone in the file (our password_file parameter)

    def url(self, database: str) -> str:
        return (f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"
                f"?password_file={self.password_file}")

    def admin(self, sql: str) -> list[tuple[Any, ...]]:
        """One statement as the superuser (CREATE DATABASE, pg_terminate_backend, ...);
        the rows it returns."""
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres",
                             dbname="postgres", autocommit=True, connect_timeout=10) as db:
            cursor = db.execute(sql)  # type: ignore[arg-type]
            return list(cursor.fetchall()) if cursor.description else []


def _postgres_bin() -> Path:
    """The newest PostgreSQL server installed (Debian 12 has 15, Debian 13 has 17)."""
    found = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
             if path.parent.parent.name.isdigit()]
    if not found:
        pytest.fail("no PostgreSQL server under /usr/lib/postgresql/*/bin: install the Debian "
                    "package `postgresql` (`make install` does)")
    return max(found, key=lambda path: int(path.parent.name))


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root (CI runs as root): the postgres user runs it then.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole run, stopped (pg_ctl stop -m fast) at its end."""
    import secrets
    import shutil
    import socket
    import tempfile

    bin_dir = _postgres_bin()
    # Not under tmp_path_factory: its parent is private to us, and the server's user
    # must reach its own directory.
    base = Path(tempfile.mkdtemp(prefix="p11grid-pg-"))
    data, sockets = base / "data", base / "sockets"
    sockets.mkdir()
    superuser_pw = base / "superuser.pw"
    superuser_pw.write_text(secrets.token_urlsafe(18) + "\n")
    if os.geteuid() == 0:
        for path in (base, sockets, superuser_pw):
            shutil.chown(path, "postgres", "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = base / "server.log"

    def run(*command: str, timeout: float = 120) -> None:
        done = subprocess.run(_as_postgres(list(command)), cwd=base, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{Path(command[0]).name} failed: {done.stdout}{done.stderr}"
                        f"{server_log}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
        f"--pwfile={superuser_pw}", "--auth-local=trust", "--auth-host=scram-sha-256",
        "-E", "UTF8", "--locale=C", "--no-sync")
    settings = (f"-c listen_addresses=127.0.0.1 -p {port} "
                f"-c unix_socket_directories='{sockets}' -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
        "-o", settings, "start")
    user = "p11grid_test"
    password = secrets.token_urlsafe(18)
    password_file = tmp_path_factory.mktemp("postgres") / "registry.pw"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    server = PostgresServer(bin_dir, data, sockets, port, user, password_file)
    try:
        server.admin(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        yield server
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-t", "30",
                                     "-m", "fast", "stop"]), cwd=base, capture_output=True,
                       timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database for this test only, owned by a
    password-authenticated role: `postgresql://p11grid_test@127.0.0.1:PORT/p11grid_XXXX
    ?password_file=PATH`. Empty means no schema yet: run `p11grid db upgrade --registry
    URL` (or grid_backend.registry.migrations.upgrade) before opening it as a registry.
    Several registry objects or grid nodes (`[grid] registry = URL`, each with its own
    `node`) may share it. The database is dropped after the test."""
    import secrets

    name = f"p11grid_{secrets.token_hex(6)}"
    postgres_server.admin(f"CREATE DATABASE {name} OWNER {postgres_server.user}")
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


P11KIT_MODULES = Path("/etc/pkcs11/modules")


@pytest.fixture()
def p11kit_registration(sandbox_environ: dict[str, str]) -> Iterator[Path]:
    """Our module file in /etc/pkcs11/modules for one test (p11-kit ignores the user's
    own configuration when run as root), removed afterwards with what it created."""
    created = [d for d in (P11KIT_MODULES.parent, P11KIT_MODULES) if not d.exists()]
    installed = subprocess.run([sys.executable, "-m", "p11grid", "config", "p11kit",
                                "--install", str(P11KIT_MODULES)], env=sandbox_environ,
                               capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    module_file = P11KIT_MODULES / "p11grid.module"
    try:
        yield module_file
    finally:
        module_file.unlink(missing_ok=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
