"""`p11grid sandbox up|down DIR`: a ready-to-use world around a grid of secure elements.

`up` lays out, inside DIR: a SoftHSM2 token `vm-se` with an RSA-2048 and an EC P-256 key
generated inside it, a throwaway CA that certifies both for TLS on localhost (certificates
stored in the token too), a virtual PIV card `piv-se` (DIR/piv) with an RSA-2048 key
`piv-rsa` generated inside it, run with its own pcscd in a network namespace of its own, a
grid service (DIR/grid) hosting both elements, serving them over TLS to the VM's identity
and the card over RACS to `racs-admin`, the module config pointing at the grid (and a
second one, p11grid-local.toml, driving the token in-process), an OpenSSL config that
loads the libp11 engine on our module, and DIR/env to source. `down` stops what state.json
recorded and removes DIR. Everything a later step or test needs is named in DIR/env.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from idm.authority import Authority
from p11grid import (
    ca,
    paths,
    sandbox_grid,
    sandbox_identity,
    sandbox_piv,
    sandbox_token,
    snippets,
)

Say = Callable[[str], None]

TOKEN_LABEL = "vm-se"
CA_COMMON_NAME = "p11grid sandbox CA"
# A PIV PIN is 6 to 8 digits, and one PIN (P11GRID_PIN) opens both elements.
USER_PIN_DIGITS = 8
SO_PIN_DIGITS = 16
STOP_DEADLINE_SECONDS = 10.0
STATE_VERSION = 1
# Paths go verbatim into SoftHSM2, TOML, OpenSSL and nginx configs and a shell file.
SAFE_PATH = re.compile(r"[A-Za-z0-9._/+@,:=~-]+")

ENV_NAMES = (
    "P11GRID_MODULE",
    "P11GRID_CONF",
    "P11GRID_TOKEN",
    "P11GRID_PIN",
    "P11GRID_RSA_URI",
    "P11GRID_EC_URI",
    "OPENSSL_CONF",
    "P11GRID_DIRECT_MODULE",
    "P11GRID_DIRECT_TOKEN",
    "SOFTHSM2_CONF",
    "P11GRID_CA",
    "P11GRID_SANDBOX",
    "P11GRID_DIRECT_OPENSSL_CONF",
    "P11GRID_LOCAL_CONF",
    "P11GRID_GRID_PIDFILE",
    "P11GRID_GRID_ADDR",
    "P11GRID_GRID_CONF",
    "P11GRID_REGISTRY",
    "P11GRID_PIV_URI",
    "P11GRID_RACS_ADDR",
    "P11GRID_RACS_CERT",
    "P11GRID_RACS_KEY",
    "P11GRID_RACS_CA",
    "PCSCLITE_CSOCK_NAME",
    "P11GRID_VM_TOKEN",
    "P11GRID_IDP_URL",
    "P11GRID_APP_TOKEN",
    "P11GRID_HV_KEY_URI",
    "P11GRID_CA_DIR",
)
GRID_PROCESS = "grid"
IDP_PROCESS = "idp"
PIV_PROCESS = "piv"


class SandboxError(RuntimeError):
    """A sandbox could not be built, found or torn down; the message says why."""


@dataclass(frozen=True)
class Sandbox:
    """The layout of one sandbox directory."""

    directory: Path

    @property
    def softhsm_conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def tokens_dir(self) -> Path:
        return self.directory / "tokens"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca" / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def module_conf(self) -> Path:
        return self.directory / "p11grid.toml"

    @property
    def local_module_conf(self) -> Path:
        return self.directory / "p11grid-local.toml"

    @property
    def grid(self) -> sandbox_grid.GridLayout:
        return sandbox_grid.GridLayout(self.directory / "grid")

    @property
    def piv(self) -> sandbox_piv.PivLayout:
        return sandbox_piv.PivLayout(self.directory / "piv")

    @property
    def module_log(self) -> Path:
        return self.directory / "p11grid.log"

    @property
    def openssl_conf(self) -> Path:
        return self.directory / "openssl.cnf"

    @property
    def direct_openssl_conf(self) -> Path:
        return self.directory / "openssl-direct.cnf"

    @property
    def env_file(self) -> Path:
        return self.directory / "env"

    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    def certificate(self, key_label: str) -> Path:
        return self.directory / f"{key_label}.pem"

    def env(self) -> dict[str, str]:
        """The variables of DIR/env."""
        return load_env(self.env_file)


def key_uri(key_label: str, token_label: str = TOKEN_LABEL) -> str:
    """RFC 7512 URI of a private key as nginx and the libp11 engine take it (no PIN in it)."""
    return f"pkcs11:token={token_label};object={key_label};type=private"


def load_env(env_file: Path) -> dict[str, str]:
    """Read back a file of `export NAME='value'` lines."""
    variables: dict[str, str] = {}
    for line in env_file.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            variables[name] = value
    return variables


# --- state.json: what `down` must stop -------------------------------------------------


@contextlib.contextmanager
def _state_lock(sandbox: Sandbox) -> Iterator[None]:
    # Services started by several tools may record themselves at once.
    with open(sandbox.directory / ".state.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_state(directory: Path) -> dict[str, Any]:
    state_file = Sandbox(directory).state_file
    try:
        state: dict[str, Any] = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise SandboxError(f"{directory} holds no sandbox (no state.json)") from None
    except json.JSONDecodeError as error:
        raise SandboxError(f"{state_file} is not valid JSON: {error}") from None
    state.setdefault("processes", [])
    return state


def _write_state(sandbox: Sandbox, state: dict[str, Any]) -> None:
    temporary = sandbox.state_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, sandbox.state_file)


def _process_start_ticks(pid: int) -> int | None:
    """Start time of a live process (field 22 of /proc/PID/stat); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    if fields[0] == "Z":
        return None
    return int(fields[19])


def record_process(
    directory: Path, name: str, pid: int, *, process_group: int | None = None
) -> None:
    """Note a process that `down` must stop. Its start time guards against a reused pid;
    with `process_group`, `down` signals the whole group (e.g. nginx and its workers)."""
    sandbox = Sandbox(directory.resolve())
    with _state_lock(sandbox):
        state = read_state(sandbox.directory)
        entry: dict[str, Any] = {
            "name": name,
            "pid": pid,
            "start_ticks": _process_start_ticks(pid),
            "process_group": process_group,
        }
        state["processes"] = [p for p in state["processes"] if p["name"] != name] + [entry]
        _write_state(sandbox, state)


def forget_process(directory: Path, name: str) -> None:
    """Drop a process from state.json once its owner has stopped it."""
    sandbox = Sandbox(directory.resolve())
    if not sandbox.state_file.exists():
        return
    with _state_lock(sandbox):
        state = read_state(sandbox.directory)
        state["processes"] = [p for p in state["processes"] if p["name"] != name]
        _write_state(sandbox, state)


def _is_recorded_process(entry: dict[str, Any]) -> bool:
    ticks = _process_start_ticks(int(entry["pid"]))
    return ticks is not None and (entry.get("start_ticks") in (None, ticks))


def _running(entry: dict[str, Any]) -> bool:
    if _is_recorded_process(entry):
        return True
    group = entry.get("process_group")
    if not group:
        return False
    return _group_has_live_members(int(group))


def _group_has_live_members(group: int) -> bool:
    """Members left behind by a dead leader (orphaned workers). Zombies do not count: a
    leader whose parent (`sandbox up`) has exited waits for init to reap it, which can take
    seconds, and kill(-group, 0) still succeeds on it meanwhile."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_file.read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == group:
            return True
    return False


def stop_process_group(process: subprocess.Popen[bytes], deadline: float) -> None:
    """Stop a process we started as a group leader: SIGTERM to its group, SIGKILL after
    `deadline` seconds, then SIGKILL to whatever is left in the group (workers of a killed
    master would keep their ports and the token open)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=deadline)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _signal(entry: dict[str, Any], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if entry.get("process_group"):
            os.killpg(int(entry["process_group"]), signum)
        else:
            os.kill(int(entry["pid"]), signum)


def _reap(pid: int) -> None:
    # Our own child stays a zombie until waited for; anyone else's is reaped by its parent.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(entry: dict[str, Any], say: Say, deadline: float = STOP_DEADLINE_SECONDS) -> None:
    """SIGTERM, then SIGKILL once the deadline passes."""
    name, pid = entry["name"], int(entry["pid"])
    _reap(pid)
    if not _running(entry):
        say(f"sandbox: {name} (pid {pid}) was already stopped")
        return
    _signal(entry, signal.SIGTERM)
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        _reap(pid)
        if not _running(entry):
            say(f"sandbox: stopped {name} (pid {pid})")
            return
        time.sleep(0.05)
    _signal(entry, signal.SIGKILL)
    _reap(pid)
    say(f"sandbox: killed {name} (pid {pid}): it ignored SIGTERM for {deadline:.0f} s")


# --- up ----------------------------------------------------------------------------------


def _check_directory(directory: Path) -> None:
    if not SAFE_PATH.fullmatch(str(directory)):
        raise SandboxError(
            f"{directory}: use a path of letters, digits and ._/+@,:=~- only "
            "(it is written verbatim into several config files)"
        )
    if Sandbox(directory).state_file.exists():
        raise SandboxError(
            f"{directory} already holds a live sandbox; "
            f"run `p11grid sandbox down {directory}` first"
        )
    if directory.exists() and not directory.is_dir():
        raise SandboxError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        raise SandboxError(
            f"{directory} is not empty; `sandbox down` removes its directory, "
            "so `sandbox up` only uses a new or empty one"
        )


def _softhsm_conf_text(sandbox: Sandbox) -> str:
    return (
        f"# SoftHSM2 configuration of the p11grid sandbox {sandbox.directory}\n"
        f"directories.tokendir = {sandbox.tokens_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "# nginx forks after C_Initialize; without this a child gets ALREADY_INITIALIZED.\n"
        "library.reset_on_fork = true\n"
    )


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _module_conf_text(sandbox: Sandbox, softhsm_library: Path) -> str:
    return (
        "# p11grid module configuration of the sandbox (read via $P11GRID_CONF)\n"
        "[module]\n"
        'backend = "local"\n'
        f"log_file = {_toml_string(str(sandbox.module_log))}\n"
        'log_level = "info"\n'
        "\n"
        "[[secure_element]]\n"
        f"label = {_toml_string(TOKEN_LABEL)}\n"
        'driver = "pkcs11"\n'
        f"library = {_toml_string(str(softhsm_library))}\n"
        f"token_label = {_toml_string(TOKEN_LABEL)}\n"
        "[secure_element.environment]\n"
        f"SOFTHSM2_CONF = {_toml_string(str(sandbox.softhsm_conf))}\n"
    )


def openssl_conf_text(sandbox: Sandbox, engine: Path, module: Path, pin: str) -> str:
    """An OpenSSL config loading the libp11 engine on `module` (p11grid/snippets.py)."""
    return snippets.openssl_engine_conf(
        engine, module, pin, f"OpenSSL configuration of the p11grid sandbox {sandbox.directory}")


def _env_text(variables: dict[str, str]) -> str:
    lines = ["# p11grid sandbox: source this file (. DIR/env) to use the sandbox"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    return "\n".join(lines) + "\n"


def _init_token(sandbox: Sandbox, pin: str, so_pin: str) -> str:
    command = [
        str(paths.softhsm_util()),
        "--init-token",
        "--free",
        "--label",
        TOKEN_LABEL,
        "--pin",
        pin,
        "--so-pin",
        so_pin,
    ]
    environment = {**sandbox_token.clean_environment(), "SOFTHSM2_CONF": str(sandbox.softhsm_conf)}
    result = subprocess.run(
        command, env=environment, capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
        raise SandboxError(f"softhsm2-util --init-token failed: {reason}")
    return result.stdout.strip()


def _random_digits(count: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(count))


def up(directory: Path, say: Say = print) -> Sandbox:
    """Build a sandbox in `directory` (created if needed; it must be new or empty)."""
    directory = Path(os.path.abspath(directory))
    _check_directory(directory)
    created = not directory.exists()
    sandbox = Sandbox(directory)
    try:
        _build(sandbox, say)
    except BaseException:
        # Leave nothing half-built behind: no process we started, nothing in the directory
        # (it was new or empty).
        with contextlib.suppress(SandboxError, OSError):
            for entry in reversed(read_state(directory)["processes"]):
                stop_process(entry, lambda line: None)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        elif directory.is_dir():
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    return sandbox


def _build(sandbox: Sandbox, say: Say) -> None:
    directory = sandbox.directory
    softhsm_library = paths.softhsm_library()
    engine = paths.pkcs11_engine()
    module = paths.MODULE_PATH

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # holds the PIN, the CA key and the token
    say(f"sandbox: building in {directory}")
    _write_state(
        sandbox,
        {
            "version": STATE_VERSION,
            "status": "building",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "processes": [],
        },
    )

    sandbox.tokens_dir.mkdir(mode=0o700)
    sandbox.softhsm_conf.write_text(_softhsm_conf_text(sandbox))
    say(f"sandbox: wrote {sandbox.softhsm_conf} (token store {sandbox.tokens_dir})")

    pin = _random_digits(USER_PIN_DIGITS)
    so_pin = _random_digits(SO_PIN_DIGITS)
    _init_token(sandbox, pin, so_pin)
    say(f"sandbox: initialised SoftHSM2 token '{TOKEN_LABEL}' with a random user PIN and SO PIN")

    with sandbox_token.token_worker(sandbox.softhsm_conf) as worker:
        publics = worker.call(sandbox_token.generate_keys, str(softhsm_library), TOKEN_LABEL, pin)
        for spec in sandbox_token.SANDBOX_KEYS:
            kind = "RSA-2048" if spec.kind == "rsa" else "EC P-256"
            say(
                f"sandbox: generated {kind} key '{spec.label}' (id {spec.key_id.hex()}) inside "
                "the token: sensitive, not extractable"
            )

        sandbox.ca_key.parent.mkdir(mode=0o700)
        # The sandbox CA is the IAM root CA of the trust domain (idm.authority), so that
        # the identity layer and the TLS certificates share one root.
        iam = Authority.init(sandbox.ca_key.parent, sandbox_grid.TRUST_DOMAIN, CA_COMMON_NAME)
        shutil.copyfile(iam.directory / "ca.pem", sandbox.ca_cert)
        authority = ca.SandboxCA(key=iam.key, certificate=iam.certificate)
        say(f"sandbox: created the IAM root CA of spiffe://{iam.trust_domain} in "
            f"{iam.directory} (root {sandbox.ca_cert}, key mode 0600, revocation list "
            f"{iam.directory / 'crl.pem'})")

        objects: list[sandbox_token.CertificateObject] = []
        for spec in sandbox_token.SANDBOX_KEYS:
            certificate = ca.issue_server_certificate(authority, publics[spec.label])
            sandbox.certificate(spec.label).write_bytes(
                certificate.public_bytes(serialization.Encoding.PEM)
            )
            objects.append(_certificate_object(spec, certificate))
        worker.call(
            sandbox_token.store_certificates, str(softhsm_library), TOKEN_LABEL, pin, objects
        )
    for spec in sandbox_token.SANDBOX_KEYS:
        say(
            f"sandbox: issued a localhost certificate for '{spec.label}' -> "
            f"{sandbox.certificate(spec.label)}, also stored in the token (id {spec.key_id.hex()})"
        )

    piv = sandbox.piv
    try:
        sandbox_piv.check_requirements(piv)
        sandbox_piv.create_card(piv, pin, sandbox.ca_cert, sandbox.ca_key,
                                sandbox.certificate(sandbox_piv.KEY_LABEL))
    except (sandbox_piv.PivSetupError, ValueError, OSError) as error:
        raise SandboxError(f"virtual PIV card: {error}") from None
    say(f"sandbox: created the virtual PIV card '{sandbox_piv.SEID}' in {piv.card_state}: "
        f"RSA-2048 key '{sandbox_piv.KEY_LABEL}' generated inside it (slot "
        f"{sandbox_piv.KEY_SLOT.upper()}), same user PIN, localhost certificate "
        f"{sandbox.certificate(sandbox_piv.KEY_LABEL)}")
    try:
        piv_pid = sandbox_piv.start(piv)
    except sandbox_piv.PivSetupError as error:
        raise SandboxError(str(error)) from None
    record_process(directory, PIV_PROCESS, piv_pid, process_group=piv_pid)
    say(f"sandbox: pcscd, vpcd and the card (launcher pid {piv_pid}) run in a network "
        f"namespace of their own; pcscd's socket is {piv.socket}")

    grid = sandbox.grid
    sandbox_grid.issue_identities(grid, iam)
    say(f"sandbox: issued TLS identities for the grid service, its RACS server, the VM "
        f"({sandbox_grid.VM_IDENTITY}) and the RACS client '{sandbox_grid.RACS_ADMIN}' in "
        f"{grid.directory}")
    sandbox_grid.write_registry(grid, TOKEN_LABEL, softhsm_library, TOKEN_LABEL,
                                sandbox.softhsm_conf,
                                [(s.label, s.key_id.hex(), "rsa2048" if s.kind == "rsa"
                                  else "ec256") for s in sandbox_token.SANDBOX_KEYS])
    sandbox_grid.register_piv(grid, sandbox_piv.SEID, sandbox_piv.element_settings(),
                              [(sandbox_piv.KEY_LABEL, "01", "rsa2048")])
    say(f"sandbox: registry {grid.registry}: elements '{TOKEN_LABEL}' and "
        f"'{sandbox_piv.SEID}' bound to {sandbox_grid.VM_IDENTITY}; "
        f"'{sandbox_grid.RACS_ADMIN}' administers '{sandbox_piv.SEID}' over RACS")
    identity = sandbox_identity.IdentityLayout(directory / "identity",
                                               sandbox_grid.TRUST_DOMAIN,
                                               sandbox.softhsm_conf, softhsm_library)
    try:
        sandbox_identity.create_hypervisor(identity, iam.directory, softhsm_library)
        say(f"sandbox: hypervisor {sandbox_identity.HV_NAME}: key generated inside its own "
            f"SoftHSM2 token '{sandbox_identity.HV_TOKEN}', certified through a CSR signed in "
            f"the token -> {identity.hv_certificate} (also stored in the token)")
        idp_pid, issuer = sandbox_identity.start_idp(identity, iam)
        record_process(directory, IDP_PROCESS, idp_pid, process_group=idp_pid)
        say(f"sandbox: OpenID provider (pid {idp_pid}) at {issuer}, log {identity.idp_log}")
        sandbox_identity.issue_vm_token(identity, softhsm_library, grid.path("vm.pem"))
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        raise SandboxError(f"identity layer: {error}") from None
    say(f"sandbox: VM-Auth-Token for {sandbox_grid.VM_IDENTITY}, signed by the hypervisor's "
        f"key in its token, audience {identity.sp}, valid "
        f"{sandbox_identity.VM_TOKEN_TTL} -> {identity.vm_token}")
    port = sandbox_grid.free_port()
    racs_port = sandbox_grid.free_port()
    while racs_port == port:
        racs_port = sandbox_grid.free_port()
    sandbox_grid.write_config(grid, sandbox.ca_cert, port, racs_port,
                              sandbox_identity.grid_identity_table(identity, iam.directory,
                                                                   issuer))
    # libpcsclite reads PCSCLITE_CSOCK_NAME once per process: the service gets it at start.
    grid_pid = sandbox_grid.start(grid, sandbox.ca_cert, port, racs_port,
                                  {"PCSCLITE_CSOCK_NAME": str(piv.socket)})
    record_process(directory, GRID_PROCESS, grid_pid, process_group=grid_pid)
    say(f"sandbox: grid service (pid {grid_pid}) serving on 127.0.0.1:{port}, RACS on "
        f"127.0.0.1:{racs_port}, log {grid.log}, audit {grid.audit_log}")

    sandbox.local_module_conf.write_text(_module_conf_text(sandbox, softhsm_library))
    sandbox.module_conf.write_text(sandbox_grid.module_config_text(
        grid, sandbox.ca_cert, port, sandbox.module_log, [TOKEN_LABEL, sandbox_piv.SEID])
        + sandbox_identity.module_identity_table(identity, iam.directory, issuer,
                                                 softhsm_library))
    say(f"sandbox: wrote {sandbox.module_conf} (module config: keys in the grid, log "
        f"{sandbox.module_log}) and {sandbox.local_module_conf} (the token in-process)")
    try:
        sandbox_identity.issue_app(identity, iam.directory, module, sandbox.module_conf,
                                   TOKEN_LABEL, pin)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        raise SandboxError(f"identity layer (APP): {error}") from None
    say(f"sandbox: the VM's identity certificate over its key in the grid "
        f"({sandbox_identity.VM_SIGNING_KEY}, CSR signed through {module.name}) -> "
        f"{identity.vm_signing_certificate}; APP identity "
        f"spiffe://{sandbox_grid.TRUST_DOMAIN}/app/{sandbox_identity.APP_NAME} and its "
        f"APP-Auth-Token, signed by the VM in the grid -> {identity.app_token}")

    ca.write_private_file(
        sandbox.openssl_conf, openssl_conf_text(sandbox, engine, module, pin).encode()
    )
    say(f"sandbox: wrote {sandbox.openssl_conf} (libp11 engine {engine} on {module})")
    # The same engine straight on SoftHSM2: a baseline, and a way to tell our faults apart.
    ca.write_private_file(
        sandbox.direct_openssl_conf,
        openssl_conf_text(sandbox, engine, softhsm_library, pin).encode(),
    )
    say(f"sandbox: wrote {sandbox.direct_openssl_conf} (the same engine on SoftHSM2 directly)")

    variables = {
        "P11GRID_MODULE": str(module),
        "P11GRID_CONF": str(sandbox.module_conf),
        "P11GRID_TOKEN": TOKEN_LABEL,
        "P11GRID_PIN": pin,
        "P11GRID_RSA_URI": key_uri("vm-rsa"),
        "P11GRID_EC_URI": key_uri("vm-ec"),
        "OPENSSL_CONF": str(sandbox.openssl_conf),
        "P11GRID_DIRECT_MODULE": str(softhsm_library),
        "P11GRID_DIRECT_TOKEN": TOKEN_LABEL,
        "SOFTHSM2_CONF": str(sandbox.softhsm_conf),
        "P11GRID_CA": str(sandbox.ca_cert),
        "P11GRID_SANDBOX": str(directory),
        "P11GRID_DIRECT_OPENSSL_CONF": str(sandbox.direct_openssl_conf),
        "P11GRID_LOCAL_CONF": str(sandbox.local_module_conf),
        "P11GRID_GRID_PIDFILE": str(grid.pid_file),
        "P11GRID_GRID_ADDR": f"127.0.0.1:{port}",
        "P11GRID_GRID_CONF": str(grid.config),
        "P11GRID_REGISTRY": str(grid.registry),
        "P11GRID_PIV_URI": key_uri(sandbox_piv.KEY_LABEL, sandbox_piv.SEID),
        "P11GRID_RACS_ADDR": f"127.0.0.1:{racs_port}",
        "P11GRID_RACS_CERT": str(grid.racs_client_cert),
        "P11GRID_RACS_KEY": str(grid.racs_client_key),
        "P11GRID_RACS_CA": str(sandbox.ca_cert),
        "PCSCLITE_CSOCK_NAME": str(piv.socket),
        "P11GRID_VM_TOKEN": str(identity.vm_token),
        "P11GRID_IDP_URL": issuer,
        "P11GRID_APP_TOKEN": str(identity.app_token),
        "P11GRID_HV_KEY_URI": identity.hv_key_uri,
        "P11GRID_CA_DIR": str(iam.directory),
    }
    assert tuple(variables) == ENV_NAMES
    ca.write_private_file(sandbox.env_file, _env_text(variables).encode())
    say(f"sandbox: wrote {sandbox.env_file} (use it: . {sandbox.env_file})")

    with _state_lock(sandbox):
        state = read_state(directory)
        state["status"] = "up"
        _write_state(sandbox, state)
    if not module.exists():
        say(f"sandbox: note: {module} is not built yet (run `make install`)")
    say(f"sandbox: ready in {directory}")


def _certificate_object(
    spec: sandbox_token.KeySpec, certificate: x509.Certificate
) -> sandbox_token.CertificateObject:
    return sandbox_token.CertificateObject(
        label=spec.label,
        key_id=spec.key_id,
        der=certificate.public_bytes(serialization.Encoding.DER),
        subject_der=certificate.subject.public_bytes(),
        issuer_der=certificate.issuer.public_bytes(),
        serial=certificate.serial_number,
    )


# --- down --------------------------------------------------------------------------------


def down(directory: Path, say: Say = print, deadline: float = STOP_DEADLINE_SECONDS) -> None:
    """Stop what state.json recorded and remove the directory."""
    directory = Path(os.path.abspath(directory))
    if not directory.exists():
        say(f"sandbox: {directory} is already gone; nothing to do")
        return
    sandbox = Sandbox(directory)
    if not sandbox.state_file.exists():
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
            say(f"sandbox: removed the empty directory {directory}")
            return
        # Never delete a directory we did not build.
        raise SandboxError(f"{directory} holds no sandbox (no state.json); not removing it")
    state = read_state(directory)
    for entry in reversed(state["processes"]):
        stop_process(entry, say, deadline)
    shutil.rmtree(directory)
    say(f"sandbox: removed {directory}")
