"""nginx serving TLS on localhost with a sandbox's token keys, through the libp11 engine.

Everything nginx writes (pid, logs, temp files) stays inside the sandbox, and the master
is recorded in state.json so that `p11grid sandbox down` stops it if its owner did not.
nginx loads the key in the master and forks its workers afterwards: the case the module's
fork handling exists for (DESIGN.md section 6, lesson 1).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p11grid import paths, sandbox

DEFAULT_KEYS = ("vm-rsa", "vm-ec")
START_TIMEOUT_SECONDS = 60.0
STOP_DEADLINE_SECONDS = 10.0
# nginx hands its workers only the variables named by `env`; these reach our module.
PASSED_VARIABLES = ("OPENSSL_CONF", "P11GRID_CONF", "SOFTHSM2_CONF")
PROCESS_NAME = "nginx"


class NginxError(RuntimeError):
    """nginx did not start or stop as asked; the message carries its error log's tail."""


@dataclass
class NginxServer:
    """A running nginx of a sandbox: one HTTPS port per key label."""

    directory: Path
    process: subprocess.Popen[bytes]
    ports: dict[str, int]
    config: Path
    error_log: Path
    openssl_conf: Path
    environment: dict[str, str] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, key_label: str) -> str:
        return f"https://localhost:{self.ports[key_label]}/"

    def worker_pids(self) -> list[int]:
        """The live worker processes (children of the master)."""
        return live_children(self.pid)


def live_children(parent: int) -> list[int]:
    """The pids of `parent`'s children that are not zombies, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == parent and fields[0] != "Z":
            children.append(int(entry.name))
    return sorted(children)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(
    directory: Path,
    ports: Mapping[str, int],
    key_uris: Mapping[str, str],
    workers: int = 2,
) -> str:
    """The nginx.conf of a sandbox: one TLS server per key, all paths inside the sandbox."""
    home = directory / "nginx"
    temp = home / "temp"
    lines = [
        f"# nginx of the p11grid sandbox {directory}: TLS keys stay in the secure element",
        "daemon off;  # the starter owns the master process and records it in state.json",
        "master_process on;",
        f"worker_processes {workers};",
        "user root;  # the workers open the SoftHSM2 token files, which only root may read",
        f"pid {_quote(str(home / 'nginx.pid'))};",
        f"error_log {_quote(str(home / 'error.log'))} info;",
        *(f"env {name};" for name in PASSED_VARIABLES),
        "",
        "events {",
        "    worker_connections 64;",
        "}",
        "",
        "http {",
        f"    access_log {_quote(str(home / 'access.log'))};",
        f"    client_body_temp_path {_quote(str(temp / 'client_body'))};",
        f"    proxy_temp_path {_quote(str(temp / 'proxy'))};",
        f"    fastcgi_temp_path {_quote(str(temp / 'fastcgi'))};",
        f"    uwsgi_temp_path {_quote(str(temp / 'uwsgi'))};",
        f"    scgi_temp_path {_quote(str(temp / 'scgi'))};",
        "    default_type text/plain;",
        "    ssl_protocols TLSv1.2 TLSv1.3;",
        "    # Every connection does a full handshake, so every one signs in the token.",
        "    ssl_session_cache off;",
        "    ssl_session_tickets off;",
    ]
    for label, port in ports.items():
        lines += [
            "",
            "    server {",
            # reuseport: the kernel spreads connections over every worker.
            f"        listen 127.0.0.1:{port} ssl reuseport;",
            "        server_name localhost;",
            f"        ssl_certificate {_quote(str(directory / f'{label}.pem'))};",
            f"        ssl_certificate_key {_quote('engine:pkcs11:' + key_uris[label])};",
            "        location / {",
            f'            return 200 "key={label} protocol=$ssl_protocol '
            'cipher=$ssl_cipher pid=$pid\\n";',
            "        }",
            "    }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def last_error(path: Path) -> str:
    """The last [emerg]/[alert]/[crit]/[error] line of an nginx error log, or ''."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    serious = [line for line in lines if re.search(r"\[(emerg|alert|crit|error)\]", line)]
    return serious[-1] if serious else ""


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start(
    directory: Path,
    *,
    keys: Sequence[str] = DEFAULT_KEYS,
    workers: int = 2,
    openssl_conf: Path | None = None,
    timeout: float = START_TIMEOUT_SECONDS,
) -> NginxServer:
    """Start nginx for the sandbox in `directory`; return once every port accepts.

    `openssl_conf` defaults to the sandbox's OPENSSL_CONF (the engine on our module); the
    sandbox's openssl-direct.cnf puts the same engine straight on SoftHSM2 instead.
    """
    directory = Path(os.path.abspath(directory))
    variables = sandbox.Sandbox(directory).env()
    chosen_conf = openssl_conf or Path(variables["OPENSSL_CONF"])
    key_uris = {
        "vm-rsa": variables["P11GRID_RSA_URI"],
        "vm-ec": variables["P11GRID_EC_URI"],
    }
    if "P11GRID_PIV_URI" in variables:  # the virtual PIV card's key, in the grid too
        key_uris["piv-rsa"] = variables["P11GRID_PIV_URI"]
    home = directory / "nginx"
    (home / "temp").mkdir(parents=True, exist_ok=True)
    ports = {label: free_port() for label in keys}
    config = home / "nginx.conf"
    config.write_text(config_text(directory, ports, key_uris, workers))
    error_log = home / "error.log"
    environment = {
        **os.environ,
        "OPENSSL_CONF": str(chosen_conf),
        "P11GRID_CONF": variables["P11GRID_CONF"],
        "SOFTHSM2_CONF": variables["SOFTHSM2_CONF"],
    }
    command = [
        str(paths.nginx_binary()),
        "-p", str(home),
        "-c", str(config),
        "-e", str(error_log),  # errors before the config is read land here too
    ]  # fmt: skip
    with open(home / "stdout.log", "ab") as output:
        process = subprocess.Popen(
            command,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop reaches the workers too
        )
    server = NginxServer(
        directory=directory,
        process=process,
        ports=ports,
        config=config,
        error_log=error_log,
        openssl_conf=chosen_conf,
        environment=environment,
    )
    sandbox.record_process(directory, PROCESS_NAME, process.pid, process_group=process.pid)
    give_up = time.monotonic() + timeout
    # The master listens before it forks; ready means every worker exists too.
    while len(server.worker_pids()) < workers or not all(map(_listening, ports.values())):
        if process.poll() is not None:
            sandbox.forget_process(directory, PROCESS_NAME)
            raise NginxError(
                f"nginx exited with status {process.returncode} while starting: "
                f"{last_error(error_log) or 'no error logged'}\n"
                f"{error_log}:\n{tail(error_log)}"
            )
        if time.monotonic() > give_up:
            stop(server)
            raise NginxError(
                f"nginx did not listen on {sorted(ports.values())} with {workers} workers "
                f"within {timeout:.0f} s: {last_error(error_log) or 'no error logged'}\n"
                f"{error_log}:\n{tail(error_log)}"
            )
        time.sleep(0.1)
    return server


def stop(server: NginxServer, deadline: float = STOP_DEADLINE_SECONDS) -> int:
    """Stop nginx (SIGTERM to its process group, SIGKILL after the deadline)."""
    process = server.process
    sandbox.stop_process_group(process, deadline)
    if server.directory.exists():
        sandbox.forget_process(server.directory, PROCESS_NAME)
    return process.returncode
