"""The scale part of `make bench` (issue 5), called by bench/run.py on its sandbox.

1. **Secure elements behind one grid node**: 1, 2 and 4 SoftHSM2 tokens, each its own
   element with its own RSA-2048 and P-256 keys generated inside it (`p11grid grid keygen`),
   registered and bound to the sandbox VM's identity, served by a grid node (`p11grid grid
   serve`) started here. The load is one `p11bench --sync` process per element (one thread:
   one request in flight per element, as a card works; `spin_us = 0`, and once the
   module's default for reference), all timing the same window; the figure is the sum of
   their signatures per second, with the CPU the machine, the grid nodes and the hosts
   used in that window (from /proc).
2. **Two nodes**: the same elements split over two grid node processes (own config, port,
   and for now own SQLite registry: `write_nodes` makes every node's registry and config in
   one place, so that both can later point at one shared database), against one node with
   the same total.
3. **nginx TLS handshakes per second, RSA-2048**: the same nginx configuration
   (`p11grid.nginx.config_text`, one worker per core) with the sandbox's `vm-rsa` in the
   grid (libp11 engine on libp11grid.so, as `make demo` runs it; and with `spin_us = 0`
   for reference) and with an RSA-2048 key in a PEM file (generated here: the grid's key
   cannot leave its element), run in turn, repeatedly, by one load generator: a few
   `python bench/scale.py handshakes` processes, each doing one connection at a time (a
   full TLS handshake, one GET, close).

Everything it starts lives in DIR/scale of the sandbox and is recorded in the sandbox's
state.json, so `p11grid sandbox down` stops whatever a crash left behind. Loops are
bounded in time and count; every subprocess has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import selectors
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

Say = Callable[[str], None]

MECHS = ("rsa", "ec")
MECH_TITLES = {"rsa": "RSA-2048 CKM_RSA_PKCS", "ec": "ECDSA P-256 CKM_ECDSA"}
KEYS = {"rsa": ("scale-rsa", "51", "rsa2048"), "ec": ("scale-ec", "52", "ec256")}  # label, id
ELEMENT_COUNT = 4
SEIDS = tuple(f"scale-se-{n}" for n in range(1, ELEMENT_COUNT + 1))
NODE_NAMES = ("node-a", "node-b")
THREADS_PER_ELEMENT = 1
SO_PIN_DIGITS = 16

# Targets of issue 5.
GROWTH_MIN = 1.2  # a step N -> 2N "grows" at >= 1.2x ...
HELD_MIN = 0.9  # ... or "holds" (>= 0.9x) when the cores are busy at 2N:
BUSY_FRACTION = 0.85  # >= 85 % of the vCPUs busy machine-wide
HANDSHAKE_TARGET = 0.7  # nginx, key in the grid / key in a file, RSA-2048

HANDSHAKE_CONCURRENCY = 4  # load generator processes: two per nginx worker on 2 cores
HANDSHAKE_WARMUP_S = 0.5  # the workers have answered once already (warm_workers)
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
MAX_RESPONSE = 65536
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS_PER_CLIENT = 1_000_000

# The processes of a run set up one after the other: the identity gate in each logs in to
# the hypervisor's SoftHSM2 token, and SoftHSM2 rewrites a token's token.object at a login;
# a process initializing SoftHSM2 meanwhile (another gate) does not see that token at all
# (C_Login -> CKR_TOKEN_NOT_RECOGNIZED, "no token ... matches token='hv-se'"; seen here
# with four processes started at once).
STAGGERED = True
# A machine shared with other users: a run during which anything but ours took more than
# QUIET_OTHERS_MAX CPUs is set aside when the configuration has quiet runs, and rounds are
# added while a configuration has fewer than QUIET_MIN quiet runs, within EXTRA_BUDGET_S.
QUIET_OTHERS_MAX = 0.15
QUIET_MIN = 2
EXTRA_BUDGET_S = {"sign": 35.0, "handshakes": 25.0}
MAX_EXTRA_ROUNDS = 4
START_LEAD_S = 0.05  # from writing the start time to the processes to their start
READY_TIMEOUT_S = 90.0  # setup of all processes of a run (C_Initialize, identity gate, login)
RESULT_GRACE_S = 60.0  # after the window: teardown and the JSON line
CLI_TIMEOUT_S = 120.0
NODE_START_TIMEOUT_S = 30.0
NGINX_START_TIMEOUT_S = 60.0
STOP_DEADLINE_S = 10.0
WARM_CONNECTIONS_MAX = 200


class ScaleSetupError(Exception):
    """The scale runs could not be set up (tokens, keys, grid nodes, nginx)."""


@dataclass(frozen=True)
class ScaleSettings:
    repeats: int = 4
    seconds: float = 2.0  # timed window of every run
    warmup: float = 0.3  # signing runs; handshake runs use max(this, HANDSHAKE_WARMUP_S)
    concurrency: int = HANDSHAKE_CONCURRENCY


@dataclass(frozen=True)
class Topology:
    """Elements behind each grid node: (4,) is one node with four, (2, 2) two nodes; the
    hosts' `spin_us` (module config `[grid]`): 0, or None for the sandbox's (the default)."""

    per_node: tuple[int, ...]
    spin_us: int | None = 0

    @property
    def elements(self) -> int:
        return sum(self.per_node)

    @property
    def nodes(self) -> int:
        return len(self.per_node)

    def describe(self) -> str:
        if self.nodes == 1:
            plural = "element" if self.elements == 1 else "elements"
            text = f"1 node, {self.elements} {plural}"
        else:
            text = f"{self.nodes} nodes, " + " + ".join(map(str, self.per_node)) + " elements"
        return text + (", hosts spinning" if self.spin_us is None else "")

    def assignment(self) -> list[tuple[str, str]]:
        """(node, seid) for each element: consecutive elements to consecutive nodes."""
        pairs: list[tuple[str, str]] = []
        for node, count in zip(NODE_NAMES, self.per_node, strict=False):
            pairs += [(node, SEIDS[len(pairs) + i]) for i in range(count)]
        return pairs


ONE_NODE = tuple(Topology((n,)) for n in (1, 2, 4))
TWO_NODES = Topology((2, 2))
# For reference: four elements with the module's default spin (a lone request polls for
# its reply for up to 1 ms): on a 2-vCPU machine the polling hosts take the grid's cores.
SPINNING = Topology((4,), spin_us=None)
SPINNING_MECHS = ("rsa",)  # the case where a host's poll lasts longest; time budget
TOPOLOGIES = (*ONE_NODE, TWO_NODES, SPINNING)
# grid: the sandbox's module config as it is (spin_us 1000); grid-nospin: the same with
# spin_us = 0, for reference; file: the key in a PEM file.
HANDSHAKE_VARIANTS = ("grid", "grid-nospin", "file")
VARIANT_TITLES = {
    "grid": "key in the grid (engine → libp11grid), sandbox config",
    "grid-nospin": "key in the grid, `spin_us = 0` (reference)",
    "file": "key in a PEM file",
}


# --- CPU from /proc -------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    at: float  # monotonic seconds
    busy: int  # machine-wide ticks, all CPUs
    total: int
    processes: Mapping[int, int]  # pid -> utime + stime ticks (all its threads)


@dataclass(frozen=True)
class CpuUse:
    machine: float  # CPUs busy machine-wide
    roles: Mapping[str, float]  # CPUs used by our processes, by role

    @property
    def others(self) -> float:
        """CPUs busy with anything but our processes: other users' processes (short-lived
        ones included) and the kernel's interrupt work (a few hundredths when idle)."""
        return max(self.machine - sum(self.roles.values()), 0.0)


def _machine_ticks() -> tuple[int, int]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _process_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # gone
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def cpu_sample(pids: Sequence[int]) -> CpuSample:
    busy, total = _machine_ticks()
    ticks = {pid: t for pid in pids if (t := _process_ticks(pid)) is not None}
    return CpuSample(time.monotonic(), busy, total, ticks)


def cpu_use(before: CpuSample, after: CpuSample, roles: Mapping[str, Sequence[int]]) -> CpuUse:
    """CPUs used between two samples, machine-wide and by each role's processes."""
    ncpu = os.cpu_count() or 1
    total = max(after.total - before.total, 1)
    seconds = max(after.at - before.at, 1e-6) * os.sysconf("SC_CLK_TCK")
    used = {
        role: sum(after.processes[pid] - before.processes[pid]
                  for pid in pids if pid in before.processes and pid in after.processes)
        / seconds
        for role, pids in roles.items()
    }
    return CpuUse((after.busy - before.busy) / total * ncpu, used)


# --- processes sharing one timed window (p11bench --sync and the handshake client) ------


@dataclass(frozen=True)
class SyncedOutcome:
    ok: bool
    results: tuple[dict[str, Any], ...] = ()
    cpu: CpuUse | None = None
    detail: str = ""


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_DEADLINE_S)


def _stderr_tail(handle: IO[bytes]) -> str:
    handle.seek(0)
    lines = handle.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def run_synced(
    commands: Sequence[tuple[Sequence[str], Mapping[str, str]]],
    warmup: float,
    seconds: float,
    roles: Mapping[str, Sequence[int]],
    say: Say,
    role_of_commands: str = "hosts",
) -> SyncedOutcome:
    """Start the commands one after the other, each once the previous one printed "ready"
    (see STAGGERED), hand all of them one start time (CLOCK_MONOTONIC ns), sample the CPU at
    the start and the end of the timed window, and return each one's JSON line. `roles` are
    other processes whose CPU counts (grid nodes, nginx workers); the commands' own CPU
    counts as `role_of_commands`."""
    procs: list[subprocess.Popen[bytes]] = []
    errs: list[IO[bytes]] = []
    buffers: list[bytearray] = []
    selector = selectors.DefaultSelector()
    try:
        def pump(until: Callable[[], bool], deadline: float, setup: bool) -> str | None:
            """Read the outputs until `until()`; an error text on a timeout, or (`setup`)
            when a process ends before it said "ready"."""
            while not until():
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timed out"
                for key, _ in selector.select(timeout=min(left, 0.5)):
                    index = int(key.data)
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if chunk:
                        buffers[index] += chunk
                        continue
                    selector.unregister(key.fileobj)  # end of its output
                    if setup and b"ready\n" not in buffers[index]:
                        try:
                            code: int | None = procs[index].wait(timeout=STOP_DEADLINE_S)
                        except subprocess.TimeoutExpired:
                            code = None
                        return f"process {index + 1} exited ({code}): " + _stderr_tail(
                            errs[index])
            return None

        def last_ready() -> bool:
            return b"ready\n" in buffers[-1]

        give_up = time.monotonic() + READY_TIMEOUT_S
        for cmd, env in commands:
            err = tempfile.TemporaryFile()
            errs.append(err)
            proc = subprocess.Popen(
                list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                env=dict(env),
            )
            procs.append(proc)
            buffers.append(bytearray())
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), False)
            selector.register(proc.stdout, selectors.EVENT_READ, len(procs) - 1)
            if STAGGERED:
                problem = pump(last_ready, give_up, setup=True)
                if problem is not None:
                    return SyncedOutcome(False, detail=f"before the start: {problem}")

        def all_ready() -> bool:
            return all(b"ready\n" in b for b in buffers)

        problem = pump(all_ready, give_up, setup=True)
        if problem is not None:
            return SyncedOutcome(False, detail=f"before the start: {problem}")
        start = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(START_LEAD_S * 1e9)
        for index, proc in enumerate(procs):
            assert proc.stdin is not None
            try:
                proc.stdin.write(f"{start}\n".encode())
                proc.stdin.close()
            except OSError as exc:  # it died after "ready"
                return SyncedOutcome(False, detail=f"process {index + 1}: {exc}: "
                                     + _stderr_tail(errs[index]))
        watched = {**roles, role_of_commands: [p.pid for p in procs]}
        pids = sorted({pid for group in watched.values() for pid in group})
        window_start = start / 1e9 + warmup
        _sleep_until(window_start)
        before = cpu_sample(pids)
        _sleep_until(window_start + seconds)
        after = cpu_sample(pids)

        def all_done() -> bool:
            return not selector.get_map()

        problem = pump(all_done, time.monotonic() + RESULT_GRACE_S, setup=False)
        if problem is not None:
            return SyncedOutcome(False, detail=problem)
        results = []
        for index, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                return SyncedOutcome(False, detail=f"process {index + 1} did not exit")
            lines = [
                line for line in buffers[index].decode(errors="replace").splitlines()
                if line.startswith("{")
            ]
            if code != 0 or not lines:
                return SyncedOutcome(
                    False, detail=f"process {index + 1} exited ({code}): "
                    + _stderr_tail(errs[index])
                )
            try:
                data = json.loads(lines[-1])
            except ValueError as exc:
                return SyncedOutcome(False, detail=f"bad JSON line: {exc}: {lines[-1]}")
            if not isinstance(data, dict):
                return SyncedOutcome(False, detail=f"bad JSON line: {lines[-1]}")
            results.append(data)
            errs[index].seek(0)
            for line in errs[index].read().decode(errors="replace").splitlines():
                say(f"  | {line}")
        return SyncedOutcome(True, tuple(results), cpu_use(before, after, watched))
    finally:
        selector.close()
        for proc in procs:
            _kill(proc)
        for err in errs:
            err.close()


def _sleep_until(moment: float) -> None:
    """Sleep until time.monotonic() reaches `moment` (bounded: at most a minute)."""
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(min(delay, 60.0))


# --- TOML for the configs written here (flat values, inline tables, arrays of tables) ----

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_document(comment: str, data: Mapping[str, Any]) -> str:
    """Top-level tables (dict) and arrays of tables (list of dict); checked by reading back."""
    lines = [f"# {comment}"]
    for name, table in data.items():
        tables = table if isinstance(table, list) else [table]
        header = f"[[{name}]]" if isinstance(table, list) else f"[{name}]"
        for entry in tables:
            lines += ["", header]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items()]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != dict(data):
        raise ScaleSetupError(f"TOML writer: the document does not read back:\n{text}")
    return text


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScaleSetupError(f"cannot read {path}: {exc}") from None


# --- elements, nodes and host configurations -----------------------------------------------


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without any sandbox or OpenSSL settings, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("P11GRID_", "SOFTHSM2_", "OPENSSL_", "P11_KIT_SERVER_"))
    }
    env.update(extra or {})
    return env


def _run(cmd: Sequence[str], env: Mapping[str, str], what: str) -> str:
    try:
        proc = subprocess.run(
            list(cmd), env=dict(env), capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ScaleSetupError(f"{what}: timed out after {CLI_TIMEOUT_S:g} s") from None
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise ScaleSetupError(f"{what}: {why}")
    return proc.stdout


def make_elements(box: Mapping[str, str], directory: Path, say: Say) -> None:
    """A SoftHSM2 token per element in the sandbox's token store (same user PIN), and in each
    an RSA-2048 and a P-256 key generated inside it by `p11grid grid keygen`, which records
    the element and its keys in a registry of its own (DIR/scale/provision/SEID.sqlite)."""
    softhsm_util = shutil.which("softhsm2-util") or "/usr/bin/softhsm2-util"
    token_env = clean_env({"SOFTHSM2_CONF": box["SOFTHSM2_CONF"]})
    for seid in SEIDS:  # one at a time: `--free` takes the first free slot
        so_pin = "".join(secrets.choice("0123456789") for _ in range(SO_PIN_DIGITS))
        _run([softhsm_util, "--init-token", "--free", "--label", seid, "--pin",
              box["P11GRID_PIN"], "--so-pin", so_pin], token_env, f"softhsm2-util {seid}")
    provision = directory / "provision"
    provision.mkdir(parents=True, exist_ok=True)
    cli_env = clean_env({"P11GRID_PIN": box["P11GRID_PIN"]})
    grid = [sys.executable, "-m", "p11grid", "grid"]

    def provision_one(seid: str) -> None:
        registry = ["--registry", str(provision / f"{seid}.sqlite")]
        _run([*grid, "add-se", *registry, "--seid", seid, "--driver", "pkcs11",
              "--library", box["P11GRID_DIRECT_MODULE"], "--token-label", seid,
              "--env", f"SOFTHSM2_CONF={box['SOFTHSM2_CONF']}"], cli_env, f"add-se {seid}")
        for label, key_id, kind in KEYS.values():
            _run([*grid, "keygen", *registry, "--seid", seid, "--label", label, "--id",
                  key_id, "--kind", kind], cli_env, f"keygen {seid} {label}")

    # One after the other: SoftHSM2 processes generating keys at once in one token store
    # sometimes fail (CKR_GENERAL_ERROR), whichever token each writes to.
    for seid in SEIDS:
        provision_one(seid)
    say(f"scale: {ELEMENT_COUNT} SoftHSM2 tokens ({', '.join(SEIDS)}), keys "
        + ", ".join(f"{label} ({kind})" for label, _, kind in KEYS.values())
        + " generated inside each")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    port: int
    config: Path
    directory: Path


def hosting() -> dict[str, list[str]]:
    """Which elements each node must serve for every topology (node-a: all of them)."""
    hosted: dict[str, list[str]] = {name: [] for name in NODE_NAMES}
    for topology in TOPOLOGIES:
        for node, seid in topology.assignment():
            if seid not in hosted[node]:
                hosted[node].append(seid)
    return {node: seids for node, seids in hosted.items() if seids}


def node_registry_path(directory: Path, node: str) -> Path:
    # Today one SQLite file per node. With a shared registry (PostgreSQL) every node would
    # get the same one here, and the placement below would go into it instead.
    return directory / node / "registry.sqlite"


def write_nodes(box: Mapping[str, str], directory: Path, hosted: Mapping[str, Sequence[str]]
                ) -> list[NodeConfig]:
    """Every grid node's registry (its elements, their keys, bound to the sandbox VM) and
    its service config: TLS identity, client CA and `[identity]` of the sandbox's grid."""
    from grid_backend.registry import SqliteRegistry
    from p11grid import sandbox_grid

    sandbox_grid_conf = read_toml(Path(box["P11GRID_GRID_CONF"]))
    grid_table = sandbox_grid_conf.get("grid", {})
    nodes = []
    for name, seids in hosted.items():
        node_dir = directory / name
        node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        registry = SqliteRegistry(node_registry_path(directory, name))
        try:
            for seid in seids:
                source = SqliteRegistry(directory / "provision" / f"{seid}.sqlite")
                try:
                    registry.add_element(source.element(seid))
                    for key in source.keys(seid):
                        registry.add_key(key)
                finally:
                    source.close()
                registry.bind(sandbox_grid.VM_IDENTITY, seid)
        finally:
            registry.close()
        port = sandbox_grid.free_port()
        document: dict[str, Any] = {
            "grid": {
                "listen": f"127.0.0.1:{port}",
                **{k: grid_table[k] for k in ("certificate", "key", "client_ca")},
                "registry": str(node_registry_path(directory, name)),
                "audit_log": str(node_dir / "audit.log"),
                "log_file": str(node_dir / "grid.log"),
                "pid_file": str(node_dir / "grid.pid"),
            },
        }
        if "identity" in sandbox_grid_conf:
            document["identity"] = sandbox_grid_conf["identity"]
        config = node_dir / "grid.toml"
        config.write_text(toml_document(f"scale bench grid {name}: {', '.join(seids)}",
                                        document))
        nodes.append(NodeConfig(name, port, config, node_dir))
    return nodes


@dataclass
class RunningNode:
    config: NodeConfig
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid


def _tls_client(box: Mapping[str, str]) -> ssl.SSLContext:
    grid = read_toml(Path(box["P11GRID_CONF"])).get("grid", {})
    context = ssl.create_default_context(cafile=box["P11GRID_CA"])
    context.load_cert_chain(grid["certificate"], grid["key"])
    return context


def start_node(box: Mapping[str, str], node: NodeConfig) -> RunningNode:
    from p11grid import sandbox

    output = node.directory / "grid.out"
    with output.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "p11grid", "grid", "serve", "--config", str(node.config)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            env=clean_env(),
        )
    sandbox.record_process(Path(box["P11GRID_SANDBOX"]), f"scale-{node.name}", process.pid,
                           process_group=process.pid)
    running = RunningNode(node, process)
    context = _tls_client(box)
    give_up = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < give_up:
        if process.poll() is not None:
            tail = output.read_text(errors="replace")[-1500:]
            stop_node(box, running)
            raise ScaleSetupError(f"grid {node.name} exited with {process.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=1.0) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return running
        except OSError:
            time.sleep(0.05)
    stop_node(box, running)
    raise ScaleSetupError(f"grid {node.name} did not answer on 127.0.0.1:{node.port} within "
                          f"{NODE_START_TIMEOUT_S:g} s")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    from p11grid import sandbox

    sandbox.stop_process_group(process, STOP_DEADLINE_S)


def stop_node(box: Mapping[str, str], node: RunningNode) -> None:
    from p11grid import sandbox

    _stop_group(node.process)
    sandbox.forget_process(Path(box["P11GRID_SANDBOX"]), f"scale-{node.config.name}")


HostKey = tuple[str, str, int | None]  # node, seid, spin_us (None: the sandbox's)


def write_host_configs(box: Mapping[str, str], directory: Path, nodes: Sequence[NodeConfig]
                       ) -> dict[HostKey, Path]:
    """A module configuration per (node, element, spin): the sandbox's (TLS identity,
    identity gate) with the node as the only endpoint and the element as the only slot."""
    base = read_toml(Path(box["P11GRID_CONF"]))
    hosts = directory / "hosts"
    hosts.mkdir(mode=0o700, exist_ok=True)
    configs = {}
    for spin in sorted({t.spin_us for t in TOPOLOGIES}, key=lambda v: -1 if v is None else v):
        for node in nodes:
            for seid in hosting()[node.name]:
                document = dict(base)
                document["module"] = {**base["module"],
                                      "log_file": str(directory / "module.log")}
                document["grid"] = {**base["grid"], "endpoints": [f"127.0.0.1:{node.port}"]}
                if spin is not None:
                    document["grid"]["spin_us"] = spin
                document["secure_element"] = [{"label": seid, "seid": seid}]
                name = f"{node.name}-{seid}-spin-{'default' if spin is None else spin}"
                path = hosts / f"{name}.toml"
                path.write_text(toml_document(f"scale bench host: {seid} on {node.name}",
                                              document))
                configs[(node.name, seid, spin)] = path
    return configs


def write_nospin_config(box: Mapping[str, str], directory: Path) -> Path:
    """The sandbox's module configuration with `spin_us = 0` (nginx's grid-nospin)."""
    base = read_toml(Path(box["P11GRID_CONF"]))
    document = {**base, "grid": {**base["grid"], "spin_us": 0}}
    path = directory / "p11grid-nospin.toml"
    path.write_text(toml_document("the sandbox's module config, spin_us = 0", document))
    return path


# --- nginx --------------------------------------------------------------------------------


@dataclass
class NginxVariant:
    name: str  # "grid" | "file"
    label: str  # what the page answers: key=LABEL
    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    workers: int

    def worker_pids(self) -> list[int]:
        from p11grid.nginx import live_children

        return live_children(self.process.pid)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def make_file_key(box: Mapping[str, str], directory: Path, label: str) -> Path:
    """An RSA-2048 key in a PEM file (0600) and its localhost certificate from the sandbox
    CA, as the sandbox certifies `vm-rsa`: the only difference is where the key is."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from idm.authority import Authority
    from p11grid import ca

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = directory / f"{label}.key"
    ca.write_private_file(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    iam = Authority.open(Path(box["P11GRID_SANDBOX"]) / "ca")
    certificate = ca.issue_server_certificate(
        ca.SandboxCA(key=iam.key, certificate=iam.certificate),
        key.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    (directory / f"{label}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path


def start_nginx(box: Mapping[str, str], directory: Path, variant: str, workers: int
                ) -> NginxVariant:
    """nginx from `p11grid.nginx.config_text`, in DIR/scale/nginx-VARIANT: `grid` serves the
    sandbox's vm-rsa through the engine (the sandbox's OPENSSL_CONF, P11GRID_CONF); `file`
    the same config with the key line pointing at a PEM file, and no engine loaded."""
    from p11grid import nginx, paths, sandbox, snippets

    home = directory / f"nginx-{variant}"
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    port = nginx.free_port()
    if variant in ("grid", "grid-nospin"):
        label = "vm-rsa"
        shutil.copyfile(Path(box["P11GRID_SANDBOX"]) / "vm-rsa.pem", home / "vm-rsa.pem")
        text = nginx.config_text(home, {label: port}, {label: box["P11GRID_RSA_URI"]}, workers)
        module_conf = (box["P11GRID_CONF"] if variant == "grid"
                       else str(write_nospin_config(box, directory)))
        env = clean_env({"OPENSSL_CONF": box["OPENSSL_CONF"], "P11GRID_CONF": module_conf,
                         "SOFTHSM2_CONF": box["SOFTHSM2_CONF"]})
    else:
        label = "file-rsa"
        key_file = make_file_key(box, home, label)
        placeholder = "file-key"
        text = nginx.config_text(home, {label: port}, {label: placeholder}, workers)
        engine_line = f"ssl_certificate_key {snippets.nginx_quote('engine:pkcs11:' + placeholder)};"
        if text.count(engine_line) != 1:
            raise ScaleSetupError("nginx.config_text changed: cannot find its key line "
                                  f"{engine_line!r} to point it at a file")
        text = text.replace(engine_line,
                            f"ssl_certificate_key {snippets.nginx_quote(str(key_file))};")
        env = clean_env()
    (home / "nginx" / "temp").mkdir(parents=True, exist_ok=True)
    config = home / "nginx" / "nginx.conf"
    config.write_text(text)
    error_log = home / "nginx" / "error.log"
    with (home / "nginx" / "stdout.log").open("ab") as out:
        process = subprocess.Popen(
            [str(paths.nginx_binary()), "-p", str(home / "nginx"), "-c", str(config),
             "-e", str(error_log)],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sandbox.record_process(Path(box["P11GRID_SANDBOX"]), f"scale-nginx-{variant}",
                           process.pid, process_group=process.pid)
    server = NginxVariant(variant, label, home, port, process, workers)
    give_up = time.monotonic() + NGINX_START_TIMEOUT_S
    while len(server.worker_pids()) < workers or not _listening(port):
        if process.poll() is not None or time.monotonic() > give_up:
            why = nginx.last_error(error_log) or "no error logged"
            stop_nginx(box, server)
            raise ScaleSetupError(f"nginx ({variant}) did not start with {workers} workers "
                                  f"on 127.0.0.1:{port}: {why}\n{nginx.tail(error_log)}")
        time.sleep(0.1)
    try:
        warm_workers(server, box["P11GRID_CA"])
    except ScaleSetupError as exc:
        stop_nginx(box, server)
        raise ScaleSetupError(f"{exc}\n{nginx.tail(error_log)}") from None
    return server


def warm_workers(server: NginxVariant, ca_file: str) -> None:
    """One connection at a time until every worker has answered (the page names its pid):
    a worker's first signature through the grid runs the module's identity gate, and the
    gates must not run at once (see STAGGERED)."""
    context = ssl.create_default_context(cafile=ca_file)
    seen: set[bytes] = set()
    problem = "no answer"
    give_up = time.monotonic() + NGINX_START_TIMEOUT_S
    for _ in range(WARM_CONNECTIONS_MAX):
        if len(seen) >= server.workers or time.monotonic() > give_up:
            break
        try:
            with socket.create_connection(("127.0.0.1", server.port),
                                          timeout=CONNECT_TIMEOUT_S) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(REQUEST)
                answer = _read_response(tls)
        except OSError as exc:  # ssl.SSLError included
            problem = f"{type(exc).__name__}: {exc}"
            continue
        match = re.search(rb"key=(\S+) .*pid=(\d+)", answer)
        if match is None or match.group(1).decode() != server.label:
            problem = f"unexpected answer {answer[-200:]!r}"
            continue
        seen.add(match.group(2))
    if len(seen) < server.workers:
        raise ScaleSetupError(f"nginx ({server.name}): {len(seen)} of {server.workers} workers "
                              f"answered ({problem})")


def stop_nginx(box: Mapping[str, str], server: NginxVariant) -> None:
    from p11grid import sandbox

    _stop_group(server.process)
    sandbox.forget_process(Path(box["P11GRID_SANDBOX"]), f"scale-nginx-{server.name}")


# --- the runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SignRun:
    mech: str
    topology: Topology
    ok: bool
    ops_per_s: float = 0.0  # sum over the elements' processes
    per_element: tuple[float, ...] = ()
    skew_ms: float = 0.0  # how far apart the processes' windows started or ended
    cpu: CpuUse | None = None
    errors: int = 0
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.ops_per_s


@dataclass(frozen=True)
class HandshakeRun:
    variant: str
    ok: bool
    per_s: float = 0.0
    p50_ms: float = 0.0
    protocol: str = ""
    cpu: CpuUse | None = None
    errors: int = 0
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.per_s


Run = SignRun | HandshakeRun
Result = TypeVar("Result", SignRun, HandshakeRun)


@dataclass(frozen=True)
class ScaleResults:
    settings: ScaleSettings
    ncpu: int
    nginx_workers: int
    sign: Mapping[tuple[str, Topology], tuple[SignRun, ...]]
    handshakes: Mapping[str, tuple[HandshakeRun, ...]]
    minutes: float  # wall time of the whole scale part

    def median(self, mech: str, topology: Topology) -> float | None:
        """Median ops/s of the runs the figures use (`chosen`)."""
        return _median([r.ops_per_s for r in chosen(self.sign.get((mech, topology), ()))])

    def cpu(self, runs: Sequence[Run], role: str | None) -> float | None:
        """Median CPUs of the chosen runs: machine-wide (role None) or one role's."""
        return _median([
            (r.cpu.machine if role is None else r.cpu.roles.get(role, 0.0))
            for r in chosen(runs) if r.cpu is not None
        ])

    def others(self, runs: Sequence[Run]) -> float | None:
        """Median CPUs other users' processes took during the chosen runs' windows."""
        return _median([r.cpu.others for r in chosen(runs) if r.cpu is not None])

    def handshake_median(self, variant: str) -> float | None:
        return _median([r.per_s for r in chosen(self.handshakes.get(variant, ()))])

    @property
    def failures(self) -> list[str]:
        lines = []
        for (mech, topology), runs in self.sign.items():
            for run in runs:
                if not run.ok or run.errors:
                    why = run.detail or f"{run.errors} error(s)"
                    lines.append(f"scale, {mech} {topology.describe()}: {why}")
        for variant, hruns in self.handshakes.items():
            for hrun in hruns:
                if not hrun.ok or hrun.errors:
                    why = hrun.detail or f"{hrun.errors} error(s)"
                    lines.append(f"scale, nginx {variant}: {why}")
        return lines


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def quiet(run: Run) -> bool:
    """A run during which other users' processes took at most QUIET_OTHERS_MAX CPUs."""
    return run.ok and run.cpu is not None and run.cpu.others <= QUIET_OTHERS_MAX


def chosen(runs: Sequence[Result]) -> list[Result]:
    """The runs a configuration's figures come from: its quiet runs, or all its runs that
    worked when none was quiet (the report marks those)."""
    return [r for r in runs if quiet(r)] or [r for r in runs if r.ok]


def _each(runs: Sequence[Run]) -> str:
    """Every run's figure; a run set aside (not quiet while others were) is marked *."""
    use = chosen(runs)
    return ", ".join(
        "failed" if not r.ok else f"{r.rate:,.0f}" + ("" if r in use else "*") for r in runs
    )


def sign_run(box: Mapping[str, str], base_env: Mapping[str, str], binary: Path,
             host_configs: Mapping[HostKey, Path], nodes: Mapping[str, RunningNode],
             mech: str, topology: Topology, settings: ScaleSettings, say: Say) -> SignRun:
    label = KEYS[mech][0]
    commands = []
    for node, seid in topology.assignment():
        cmd = [str(binary), "--sync", "--module", box["P11GRID_MODULE"], "--token", seid,
               "--pin", box["P11GRID_PIN"], "--key", label, "--mech", mech,
               "--threads", str(THREADS_PER_ELEMENT), "--seconds", f"{settings.seconds:g}",
               "--warmup", f"{settings.warmup:g}", "--max-ops", "2000000"]
        config = host_configs[(node, seid, topology.spin_us)]
        commands.append((cmd, {**base_env, "P11GRID_CONF": str(config)}))
    used = {node for node, _ in topology.assignment()}
    outcome = run_synced(commands, settings.warmup, settings.seconds,
                         {"grid": [nodes[n].pid for n in sorted(used)]}, say)
    if not outcome.ok:
        return SignRun(mech, topology, ok=False, detail=outcome.detail)
    try:
        rates = tuple(float(r["ops_per_s"]) for r in outcome.results)
        errors = sum(int(r["errors"]) for r in outcome.results)
        starts = [int(r["window_start_ns"]) for r in outcome.results]
        ends = [int(r["window_end_ns"]) for r in outcome.results]
    except (KeyError, TypeError, ValueError) as exc:
        return SignRun(mech, topology, ok=False, detail=f"bad JSON result: {exc}")
    skew = max(max(starts) - min(starts), max(ends) - min(ends)) / 1e6
    return SignRun(mech, topology, True, sum(rates), rates, skew, outcome.cpu, errors)


def handshake_run(box: Mapping[str, str], server: NginxVariant, grid_pid: int | None,
                  settings: ScaleSettings, say: Say) -> HandshakeRun:
    warmup = max(settings.warmup, HANDSHAKE_WARMUP_S)
    cmd = [sys.executable, str(Path(__file__).resolve()), "handshakes",
           "--port", str(server.port), "--ca", box["P11GRID_CA"],
           "--expect", f"key={server.label} ",
           "--seconds", f"{settings.seconds:g}", "--warmup", f"{warmup:g}"]
    roles = {"nginx": server.worker_pids()}
    if server.name != "file" and grid_pid is not None:
        roles["grid"] = [grid_pid]
    outcome = run_synced([(cmd, clean_env())] * settings.concurrency, warmup,
                         settings.seconds, roles, say, role_of_commands="client")
    if not outcome.ok:
        return HandshakeRun(server.name, ok=False, detail=outcome.detail)
    try:
        rates = [float(data["per_s"]) for data in outcome.results]
        p50 = statistics.median(float(data["p50_ms"]) for data in outcome.results)
        errors = sum(int(data["errors"]) for data in outcome.results)
        protocol = str(outcome.results[0]["protocol"])
        first_error = next((str(d["first_error"]) for d in outcome.results
                            if d.get("first_error")), "")
    except (KeyError, TypeError, ValueError) as exc:
        return HandshakeRun(server.name, ok=False, detail=f"bad JSON result: {exc}")
    return HandshakeRun(server.name, True, sum(rates), p50, protocol, outcome.cpu, errors,
                        first_error)


def _sandbox_grid_pid(box: Mapping[str, str]) -> int | None:
    try:
        return int(Path(box["P11GRID_GRID_PIDFILE"]).read_text().split()[0])
    except (KeyError, OSError, ValueError, IndexError):
        return None


def scale_directory(box: Mapping[str, str]) -> Path:
    directory = Path(box["P11GRID_SANDBOX"]) / "scale"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


@contextlib.contextmanager
def grid_nodes(box: Mapping[str, str], say: Say
               ) -> Iterator[tuple[dict[str, RunningNode], dict[HostKey, Path]]]:
    """The elements, the grid nodes serving them (stopped afterwards), the hosts' configs."""
    directory = scale_directory(box)
    make_elements(box, directory, say)
    configs = write_nodes(box, directory, hosting())
    host_configs = write_host_configs(box, directory, configs)
    nodes: dict[str, RunningNode] = {}
    try:
        for config in configs:
            nodes[config.name] = start_node(box, config)
            say(f"scale: grid {config.name} (pid {nodes[config.name].pid}) on 127.0.0.1:"
                f"{config.port} serving {', '.join(hosting()[config.name])}")
        yield nodes, host_configs
    finally:
        for node in nodes.values():
            stop_node(box, node)


@contextlib.contextmanager
def nginx_servers(box: Mapping[str, str], say: Say) -> Iterator[dict[str, NginxVariant]]:
    """The nginx of every handshake variant, one worker per vCPU, stopped afterwards."""
    directory = scale_directory(box)
    servers: dict[str, NginxVariant] = {}
    workers = os.cpu_count() or 2
    try:
        for variant in HANDSHAKE_VARIANTS:
            servers[variant] = start_nginx(box, directory, variant, workers)
            say(f"scale: nginx {variant} (master pid {servers[variant].process.pid}, "
                f"{workers} workers, all answered) on 127.0.0.1:{servers[variant].port}")
        yield servers
    finally:
        for server in servers.values():
            stop_nginx(box, server)


Config = TypeVar("Config")


def schedule(configs: Sequence[Config], repeats: int, execute: Callable[[Config], Result],
             budget_s: float) -> dict[Config, list[Result]]:
    """Rounds of every configuration once, the order rotated by one place per round:
    `repeats` rounds, then more while a configuration has fewer than QUIET_MIN quiet runs
    and another round (as long as the rounds so far) fits in `budget_s`. Run k of every
    configuration belongs to round k (`paired_ratio` compares within rounds)."""
    results: dict[Config, list[Result]] = {config: [] for config in configs}
    began = time.monotonic()
    extra_began: float | None = None
    for index in range(repeats + MAX_EXTRA_ROUNDS):
        if index >= repeats:
            now = time.monotonic()
            if extra_began is None:
                extra_began = now
            round_s = (extra_began - began) / repeats
            lacking = any(sum(map(quiet, runs)) < QUIET_MIN for runs in results.values())
            if not lacking or (now - extra_began) + round_s > budget_s:
                break
        shift = index % len(configs)
        for config in [*configs[shift:], *configs[:shift]]:
            results[config].append(execute(config))
    return results


def run(box: Mapping[str, str], base_env: Mapping[str, str], binary: Path,
        settings: ScaleSettings, say: Say) -> ScaleResults:
    """The scale part on the sandbox `box` (its DIR/env); `base_env` is what a grid-path
    p11bench run gets (run.py's child_env), P11GRID_CONF is set per element here."""
    began = time.monotonic()
    sign_configs = [(mech, topology) for mech in MECHS for topology in TOPOLOGIES
                    if topology != SPINNING or mech in SPINNING_MECHS]
    planned = len(sign_configs) * settings.repeats
    done = 0

    def one_sign(config: tuple[str, Topology]) -> SignRun:
        nonlocal done
        done += 1
        mech, topology = config
        result = sign_run(box, base_env, binary, host_configs, nodes, mech, topology,
                          settings, say)
        if result.ok and result.cpu is not None:
            each = ", ".join(f"{r:,.0f}" for r in result.per_element)
            roles = result.cpu.roles
            status = (f"{result.ops_per_s:9.1f} ops/s ({each})  CPUs machine"
                      f" {result.cpu.machine:.2f}, grid {roles['grid']:.2f}, hosts"
                      f" {roles['hosts']:.2f}, others {result.cpu.others:.2f}"
                      f"  skew {result.skew_ms:.1f} ms  errors {result.errors}")
        else:
            status = f"FAILED ({result.detail})"
        count = f"{done:2d}/{planned}" if done <= planned else "extra"
        say(f"[scale {count}] {mech:<3} {topology.describe():<34} {status}")
        return result

    with grid_nodes(box, say) as (nodes, host_configs):
        say(f"scale: set up in {time.monotonic() - began:.1f} s")
        sign = schedule(sign_configs, settings.repeats, one_sign, EXTRA_BUDGET_S["sign"])
    grid_pid = _sandbox_grid_pid(box)
    planned_hs = len(HANDSHAKE_VARIANTS) * settings.repeats
    done_hs = 0

    def one_handshake(variant: str) -> HandshakeRun:
        nonlocal done_hs
        done_hs += 1
        hs = handshake_run(box, servers[variant], grid_pid, settings, say)
        if hs.ok and hs.cpu is not None:
            roles_text = ", ".join(f"{k} {v:.2f}" for k, v in hs.cpu.roles.items())
            status = (f"{hs.per_s:8.1f} handshakes/s  p50 {hs.p50_ms:.2f} ms  {hs.protocol}"
                      f"  CPUs machine {hs.cpu.machine:.2f}, {roles_text}, others"
                      f" {hs.cpu.others:.2f}  errors {hs.errors}")
        else:
            status = f"FAILED ({hs.detail})"
        count = f"{done_hs}/{planned_hs}" if done_hs <= planned_hs else "extra"
        say(f"[scale nginx {count}] {variant:<11} {status}")
        return hs

    with nginx_servers(box, say) as servers:
        handshakes = schedule(list(HANDSHAKE_VARIANTS), settings.repeats, one_handshake,
                              EXTRA_BUDGET_S["handshakes"])
    return ScaleResults(settings, os.cpu_count() or 1, os.cpu_count() or 2,
                        {k: tuple(v) for k, v in sign.items()},
                        {k: tuple(v) for k, v in handshakes.items()},
                        (time.monotonic() - began) / 60)


# --- verdicts and the report's section ------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    description: str
    measured: str
    passed: bool | None  # None: not measurable


def paired_ratio(top: Sequence[Run], bottom: Sequence[Run]) -> tuple[float | None, int]:
    """Median over the rounds of top's rate / bottom's (runs of one round ran a few seconds
    apart, so a slow change in the machine's load hits both): of the rounds where both
    were quiet, else of all rounds where both worked. Also: how many rounds were quiet."""
    pairs = [(t, b) for t, b in zip(top, bottom, strict=False)
             if t.ok and b.ok and b.rate > 0]
    calm = [(t, b) for t, b in pairs if quiet(t) and quiet(b)]
    values = [t.rate / b.rate for t, b in (calm or pairs)]
    return _median(values), len(calm)


def scaling_verdict(results: ScaleResults, mech: str) -> Verdict:
    counts = [t.elements for t in ONE_NODE]
    description = (
        f"{MECH_TITLES[mech]}, one grid node: signatures/s grow with the elements"
        f" ({' → '.join(map(str, counts))}) until the cores are busy (each step >="
        f" {GROWTH_MIN:g}x, or >= {HELD_MIN:g}x with >= {BUSY_FRACTION:.0%} of the"
        f" {results.ncpu} vCPUs busy at the larger count)"
    )
    runs = [results.sign.get((mech, topology), ()) for topology in ONE_NODE]
    busy: list[float] = []
    for these in runs:
        cpus = results.cpu(these, None)
        if cpus is None:
            return Verdict(description, "n/a (runs failed)", None)
        busy.append(cpus)
    steps, passed, noisy = [], True, []
    for i in range(1, len(ONE_NODE)):
        growth, calm = paired_ratio(runs[i], runs[i - 1])
        if growth is None:
            return Verdict(description, "n/a (runs failed)", None)
        held = busy[i] >= BUSY_FRACTION * results.ncpu and growth >= HELD_MIN
        passed = passed and (growth >= GROWTH_MIN or held)
        steps.append(f"{counts[i - 1]} → {counts[i]}: {growth:.2f}x")
        if not calm:
            noisy.append(f"{counts[i - 1]} → {counts[i]}")
    cores = " → ".join(f"{b:.2f}" for b in busy)
    note = f"; no quiet round for {', '.join(noisy)}" if noisy else ""
    return Verdict(description,
                   f"{'; '.join(steps)} (CPUs busy {cores} of {results.ncpu}{note})", passed)


def handshake_verdict(results: ScaleResults) -> Verdict:
    runs = {v: results.handshakes.get(v, ()) for v in HANDSHAKE_VARIANTS}
    value, calm = paired_ratio(runs["grid"], runs["file"])
    description = (f"nginx, RSA-2048, TLS handshakes/s: key in the grid >= {HANDSHAKE_TARGET:g}x"
                   " the same nginx with a key in a file")
    if value is None:
        return Verdict(description, "n/a (runs failed)", None)
    nospin, _ = paired_ratio(runs["grid-nospin"], runs["file"])
    grid, file = results.handshake_median("grid"), results.handshake_median("file")
    note = "" if calm else "; no quiet round"
    return Verdict(description, f"{value:.2f}x ({_fmt(grid, 0)} vs {_fmt(file, 0)}"
                   f" handshakes/s; with `spin_us = 0`: {_fmt_ratio(nospin)}{note})",
                   value >= HANDSHAKE_TARGET)


def verdicts(results: ScaleResults) -> list[Verdict]:
    return [*(scaling_verdict(results, mech) for mech in MECHS), handshake_verdict(results)]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _per_op_us(cpus: float | None, rate: float | None) -> str:
    return "n/a" if cpus is None or rate is None or rate <= 0 else f"{cpus * 1e6 / rate:,.0f}"


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=88)


def section(results: ScaleResults) -> list[str]:
    s = results.settings
    warmup = max(s.warmup, HANDSHAKE_WARMUP_S)
    same_total = next(t for t in ONE_NODE if t.elements == TWO_NODES.elements)
    lines = [
        "",
        "## Scale: secure elements, grid nodes, nginx handshakes",
        "",
        *_wrap(
            f"Measured after the runs above on the same sandbox ({results.minutes:.1f} min"
            " in all, setup included); `bench/run.py --only scale` runs this part alone."
            " Everything shares the machine's"
            f" {results.ncpu} vCPUs: hosts, grid nodes, nginx and the load generator."
        ),
        "",
        *_wrap(
            "**Elements and nodes.** Each secure element is a SoftHSM2 token of its own in"
            " the sandbox's token store (`softhsm2-util --init-token`) with an RSA-2048 key"
            " `scale-rsa` and a P-256 key `scale-ec` generated inside it, sensitive and not"
            " extractable (`p11grid grid add-se` and `p11grid grid keygen`), bound to the"
            " sandbox VM's identity. A grid node is a `p11grid grid serve` process started"
            " for this part with the sandbox grid's TLS identity, client CA and `[identity]`"
            " checks, its own port and, for now, its own SQLite registry (the shared"
            " registry is another issue's: `write_nodes` in `bench/scale.py` makes every"
            " node's registry and config in one place). `node-a` hosts the four elements,"
            " `node-b` the last two; a topology uses the first N elements, consecutive ones"
            " on the same node."
        ),
        "",
        *_wrap(
            "**Load.** One `p11bench --sync` process per element, one thread each (one"
            " request in flight per element, as a card works one command at a time), with"
            " a module configuration of its own: the sandbox's (mutual TLS, identity gate)"
            " with the element's node as the only endpoint, the element as the only slot,"
            " and `spin_us = 0`: a host alone with its request otherwise polls for the reply"
            " for up to 1 ms (the module's default), which on this machine takes the grid's"
            " cores (callers of a grid run on other machines); the row **hosts spinning**"
            " keeps the default, for reference"
            f" ({', '.join(MECH_TITLES[m] for m in SPINNING_MECHS)} only). The processes of"
            " a run set up one after the other (`C_Initialize`, identity gate, `C_Login`,"
            " key, one signature:"
            " their identity gates must not overlap, see `bench/analysis.md`), print"
            " `ready`, and all get one start time on the machine's monotonic clock:"
            f" {s.warmup:g} s warm-up, {s.seconds:g} s timed, the same window for all (their"
            " starts and ends differ by at most **skew**). ops/s is the sum of their"
            " successful signatures per second. **CPUs** are read from `/proc` at the"
            " window's start and end: `machine` counts every process, `grid` the node"
            " processes the run used, `hosts` the p11bench processes, `others` the rest"
            " (below);"
            " **µs CPU/op** is grid + hosts CPU per signature. Each (mechanism, topology)"
            f" ran {s.repeats} times, the configurations' order rotated by one place per"
            " repeat."
        ),
        "",
        *_wrap(
            "**Quiet runs, rounds and ratios.** This machine may be shared: `others`"
            " (machine minus ours) is the CPU that anything else took in a run's window:"
            " other users' processes and the kernel's interrupt work. A run is **quiet**"
            f" when others <= {QUIET_OTHERS_MAX:g} CPUs. A round runs every configuration"
            f" once; after the {s.repeats} planned rounds, more are run while a"
            f" configuration has fewer than {QUIET_MIN} quiet runs and another round fits"
            f" in {EXTRA_BUDGET_S['sign']:g} s (signatures) or"
            f" {EXTRA_BUDGET_S['handshakes']:g} s (nginx). Absolute figures (ops/s, CPUs,"
            " latency) are medians of a configuration's quiet runs (of all its runs when"
            " none was quiet); runs set aside are marked * in the runs' column. **Ratios**"
            " (vs 1 element, 2 nodes / 1 node, vs file, and the targets) are medians of the"
            " per-round ratios, over the rounds in which both runs were quiet (over all"
            " rounds when there is none: the two runs of a round ran seconds apart, under"
            " about the same load)."
        ),
        "",
        "| Mechanism | Topology | ops/s | vs 1 element | CPUs machine | CPUs grid | CPUs hosts"
        " | CPUs others | µs CPU/op | skew ms | quiet | ops/s of each run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mech in MECHS:
        one_runs = results.sign.get((mech, ONE_NODE[0]), ())
        for topology in TOPOLOGIES:
            runs = results.sign.get((mech, topology), ())
            if not runs:
                continue
            rate = results.median(mech, topology)
            grid_cpu = results.cpu(runs, "grid")
            host_cpu = results.cpu(runs, "hosts")
            both = None if grid_cpu is None or host_cpu is None else grid_cpu + host_cpu
            skews = [r.skew_ms for r in runs if r.ok]
            each = _each(runs)
            lines.append(
                f"| {MECH_TITLES[mech]} | {topology.describe()} | {_fmt(rate)}"
                f" | {_fmt_ratio(paired_ratio(runs, one_runs)[0])}"
                f" | {_fmt(results.cpu(runs, None), 2)}"
                f" | {_fmt(grid_cpu, 2)} | {_fmt(host_cpu, 2)} | {_fmt(results.others(runs), 2)}"
                f" | {_per_op_us(both, rate)} | {_fmt(max(skews) if skews else None)}"
                f" | {sum(map(quiet, runs))} of {len(runs)} | {each} |"
            )
    lines += [
        "",
        f"Two nodes against one with the same {TWO_NODES.elements} elements:",
        "",
        "| Mechanism | 1 node ops/s | 2 nodes ops/s | **2 nodes / 1 node** | quiet rounds"
        " | CPUs grid, 1 node | CPUs grid, 2 nodes | CPUs machine, 2 nodes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mech in MECHS:
        one, two = results.median(mech, same_total), results.median(mech, TWO_NODES)
        one_runs = results.sign.get((mech, same_total), ())
        two_runs = results.sign.get((mech, TWO_NODES), ())
        value, calm = paired_ratio(two_runs, one_runs)
        lines.append(
            f"| {MECH_TITLES[mech]} | {_fmt(one)} | {_fmt(two)}"
            f" | **{_fmt_ratio(value)}** | {calm} | {_fmt(results.cpu(one_runs, 'grid'), 2)}"
            f" | {_fmt(results.cpu(two_runs, 'grid'), 2)}"
            f" | {_fmt(results.cpu(two_runs, None), 2)} |"
        )
    lines += [
        "",
        *_wrap(
            "**nginx TLS handshakes, RSA-2048.** One nginx configuration"
            f" (`p11grid.nginx.config_text`: {results.nginx_workers} worker processes, one"
            " per vCPU; `ssl_session_cache off` and `ssl_session_tickets off`, so every"
            " connection is a full handshake), started once per variant: **key in the"
            " grid** serves the sandbox's `vm-rsa` through the libp11 engine on"
            " `build/libp11grid.so` with the sandbox's `OPENSSL_CONF` and `P11GRID_CONF`"
            " (as `make demo` runs it) and the sandbox's grid service; the reference row"
            " differs only by `spin_us = 0` in a copy of that module configuration; **key"
            " in a PEM file** serves an RSA-2048 key generated for the run (the grid's key"
            " is not extractable, so the file cannot hold the same key), certified by the"
            " same sandbox CA for the same names, with the system's OpenSSL configuration"
            " (no engine). Before its runs each nginx answers one connection at a time until"
            " every worker has answered (each worker's first signature runs the module's"
            " identity gate)."
        ),
        "",
        *_wrap(
            f"Load generator (the same for all): {s.concurrency} processes of `python"
            " bench/scale.py handshakes`, each one connection at a time: TCP connect, a"
            " full TLS handshake (Python's `ssl`, i.e. OpenSSL; it verifies the chain to"
            " the sandbox CA and the name `localhost`, and offers no session to resume),"
            " one `GET /` with `Connection: close`, the answer read and checked, close."
            " Four connections in flight keep both workers busy (a worker with the key in"
            " the grid waits for its signature) without queueing much. Preferred to"
            " `openssl s_time -new`, which ends its runs on whole seconds of `time()` and"
            " counts from its own start, so several instances share no exact window; both"
            " cost about the same client CPU per handshake (`bench/analysis.md`). Each"
            f" run: {warmup:g} s warm-up, {s.seconds:g} s timed (connections completed in"
            f" the window); the variants alternate, {s.repeats} runs each, the first one"
            " rotated per repeat. **µs CPU per handshake** divides each role's CPU by the"
            " handshakes/s."
        ),
        "",
        "| Key | handshakes/s | vs file | p50 ms | CPUs machine | CPUs others"
        " | µs CPU/handshake nginx | µs CPU/handshake grid | µs CPU/handshake client"
        " | protocol | quiet | handshakes/s of each run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    file_runs = results.handshakes.get("file", ())
    for variant in HANDSHAKE_VARIANTS:
        hruns = results.handshakes.get(variant, ())
        rate = results.handshake_median(variant)
        p50 = _median([r.p50_ms for r in chosen(hruns)])
        protocols = sorted({r.protocol for r in hruns if r.ok})
        each = _each(hruns)
        grid_cell = ("none" if variant == "file"
                     else _per_op_us(results.cpu(hruns, "grid"), rate))
        lines.append(
            f"| {VARIANT_TITLES[variant]} | {_fmt(rate)}"
            f" | {_fmt_ratio(paired_ratio(hruns, file_runs)[0])} | {_fmt(p50, 2)}"
            f" | {_fmt(results.cpu(hruns, None), 2)} | {_fmt(results.others(hruns), 2)}"
            f" | {_per_op_us(results.cpu(hruns, 'nginx'), rate)} | {grid_cell}"
            f" | {_per_op_us(results.cpu(hruns, 'client'), rate)}"
            f" | {', '.join(protocols) or 'n/a'} | {sum(map(quiet, hruns))} of {len(hruns)}"
            f" | {each} |"
        )
    return lines


# --- the load generator: `python bench/scale.py handshakes ...` ------------------------------


@dataclass
class _ClientState:
    count: int = 0
    errors: int = 0
    latencies: list[int] = field(default_factory=list)
    protocol: str = ""
    first_error: str = ""


def _read_response(tls: ssl.SSLSocket) -> bytes:
    """The HTTP answer: headers, then Content-Length bytes (or until the server closes)."""
    data = bytearray()
    length: int | None = None
    header_end = -1
    while len(data) < MAX_RESPONSE:
        if header_end < 0:
            header_end = data.find(b"\r\n\r\n")
            if header_end >= 0:
                match = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", bytes(data[:header_end]))
                length = int(match.group(1)) if match else None
        if length is not None and len(data) >= header_end + 4 + length:
            break
        try:
            chunk = tls.recv(16384)
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _client_loop(state: _ClientState, context: ssl.SSLContext, port: int, expect: bytes,
                 window: tuple[int, int]) -> None:
    counted_from, stop = window
    for _ in range(MAX_CONNECTIONS_PER_CLIENT):
        began = time.monotonic_ns()
        if began >= stop:
            return
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(REQUEST)
                answer = _read_response(tls)
                state.protocol = state.protocol or str(tls.version())
        except OSError as exc:  # ssl.SSLError included
            answer, problem = b"", f"{type(exc).__name__}: {exc}"
        else:
            problem = "" if expect in answer else f"unexpected answer {answer[-200:]!r}"
        ended = time.monotonic_ns()
        if problem:
            state.errors += 1
            state.first_error = state.first_error or problem
            continue
        if counted_from <= ended <= stop:
            state.count += 1
            if began >= counted_from:
                state.latencies.append(ended - began)


def handshake_client(argv: Sequence[str]) -> int:
    """One connection at a time to 127.0.0.1:PORT for the window it is handed (the --sync
    protocol of p11bench); the runs start several of these processes at once."""
    parser = argparse.ArgumentParser(prog="scale.py handshakes",
                                     description="TLS handshakes against 127.0.0.1:PORT")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--expect", required=True, help="text every answer must contain")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=HANDSHAKE_WARMUP_S)
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 600 and 0 <= args.warmup <= 60):
        parser.error("--seconds (0, 600], --warmup [0, 60]")
    context = ssl.create_default_context(cafile=args.ca)
    print("ready", flush=True)
    line = sys.stdin.readline()
    try:
        start = int(line)
    except ValueError:
        print(f"scale.py handshakes: bad start time {line!r}", file=sys.stderr)
        return 1
    if start - time.monotonic_ns() > 60e9:
        print("scale.py handshakes: start time more than 60 s away", file=sys.stderr)
        return 1
    _sleep_until(start / 1e9)
    counted_from = start + int(args.warmup * 1e9)
    stop = counted_from + int(args.seconds * 1e9)
    state = _ClientState()
    _client_loop(state, context, args.port, args.expect.encode(), (counted_from, stop))
    latencies = sorted(state.latencies)
    if state.first_error:
        print(f"scale.py handshakes: {state.errors} failed connection(s), first:"
              f" {state.first_error}", file=sys.stderr)
    window = (stop - counted_from) / 1e9
    print(json.dumps({
        "handshakes": state.count, "seconds": window, "per_s": state.count / window,
        "p50_ms": latencies[len(latencies) // 2] / 1e6 if latencies else 0.0,
        "errors": state.errors, "first_error": state.first_error, "protocol": state.protocol,
        "window_start_ns": counted_from, "window_end_ns": stop,
    }), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "handshakes":
        print("usage: scale.py handshakes --port P --ca FILE --expect TEXT [--seconds S]"
              " [--warmup S]  (the scale runs themselves: bench/run.py --only scale)",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(handshake_client(sys.argv[2:]))
