"""`make bench`: libp11grid (in-process and through the grid) against SoftHSM2 used directly
and behind p11-kit's own remoting, signing with RSA-2048 and P-256.

Steps:
  1. compile bench/p11bench.c into build/bench/p11bench when it is missing or stale;
  2. bring up a fresh sandbox (`p11grid sandbox up DIR`, DIR in a temp directory; it starts
     the grid service) and read DIR/env for the module paths, configs, token labels and PIN;
  3. start `p11-kit server -f` on the sandbox's SoftHSM2 token, its unix socket in a temp
     directory, and find `p11-kit-client.so`;
  4. run p11bench, one process per run (never two modules in one process), for
     {direct SoftHSM, p11-kit remoting, libp11grid local, libp11grid -> grid} x {rsa, ec}
     x {1, 2 threads}, the four modules of a configuration back to back in a rotating
     order, repeating every configuration, then take the median per configuration;
  5. cold start: `p11bench --cold`, a fresh process per run, `--cold-runs` times per module
     (grid with the identity gate; local, direct and p11-kit for reference), timing
     C_Initialize to the first signature and each step between;
  6. requests per signature: fresh grid-path processes signing exactly N times (200, 2000,
     and 2000 on 2 threads), counting the grid's audit lines, the OpenID provider's token
     requests and the host's connect()s (strace, when usable) that each run caused;
  7. stop the p11-kit server; the scale part (bench/scale.py): signatures/s with 1, 2 and 4
     secure elements behind one grid node and with two nodes, and nginx TLS handshakes/s
     with the key in the grid against a key in a file;
  8. bring the sandbox down and write docs/BENCHMARKS.md with the figures, the ratios, the
     latency each path adds to the direct token, the cold starts, the counted requests,
     the scale runs, and PASS/MISS per target.

`--only main` skips step 7; `--only scale` runs steps 1, 2, 7 and 8 only, and writes its
report to build/bench/scale.md unless `--output` says otherwise (docs/BENCHMARKS.md stays
the full run's).

Exit status: 0 when every run succeeded without errors (missed targets are reported, not
fatal); 1 when any run failed or reported errors; 2 when setup (compile, sandbox, p11-kit
server) failed.

`--profile` instead runs the ECDSA 1-thread case of `--profile-module` (local or grid) once
under py-spy (when installed) and writes build/bench/profile-host.svg (the p11bench host),
plus build/bench/profile-grid.svg (the grid service) for the grid; it does not run the
benchmark or touch the docs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import scale  # bench/scale.py, next to this file

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "p11bench.c"
BUILD_DIR = ROOT / "build" / "bench"
BINARY = BUILD_DIR / "p11bench"
DOC = ROOT / "docs" / "BENCHMARKS.md"
DEFAULT_P11GRID = ROOT / ".venv" / "bin" / "p11grid"
P11KIT_INCLUDE = "/usr/include/p11-kit-1"
CC_FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{P11KIT_INCLUDE}"]

ENV_NAMES = (
    "P11GRID_MODULE",
    "P11GRID_DIRECT_MODULE",
    "SOFTHSM2_CONF",
    "P11GRID_CONF",
    "P11GRID_TOKEN",
    "P11GRID_DIRECT_TOKEN",
    "P11GRID_PIN",
    "P11GRID_LOCAL_CONF",
    "P11GRID_GRID_ADDR",
)
MECHS = ("rsa", "ec")
THREADS = (1, 2)
# direct: libsofthsm2.so; p11kit: p11-kit-client.so -> `p11-kit server` -> libsofthsm2.so;
# local: libp11grid.so driving SoftHSM2 in-process (P11GRID_LOCAL_CONF);
# grid: libp11grid.so -> the sandbox's grid service over TLS 1.3 -> SoftHSM2 (P11GRID_CONF).
MODULES = ("direct", "p11kit", "local", "grid")
REMOTE_MODULES = ("p11kit", "grid")
KEY_LABELS = {"rsa": "vm-rsa", "ec": "vm-ec"}
MECH_TITLES = {"rsa": "RSA-2048 CKM_RSA_PKCS", "ec": "ECDSA P-256 CKM_ECDSA"}
MODULE_TITLES = {
    "direct": "SoftHSM2 direct",
    "p11kit": "p11-kit remoting",
    "local": "libp11grid local",
    "grid": "libp11grid → grid",
}
# Issue 2: minimum libp11grid-local/direct ops/s ratio at 1 thread, per mechanism.
RATIO_TARGETS = {"rsa": 0.9, "ec": 0.6}
# Issue 3: minimum libp11grid-through-the-grid/p11-kit-remoting ops/s ratio, at 1 and 2 threads.
REMOTE_TARGETS = {"rsa": 1.0, "ec": 0.7}
P11KIT_CLIENT_NAME = "p11-kit-client.so"
P11KIT_PACKAGE = "p11-kit-modules"  # holds p11-kit-client.so (the `p11-kit` command: p11-kit)
P11KIT_START_TIMEOUT = 15.0


class SetupError(Exception):
    """The benchmark could not be set up (compiler, sandbox, environment file)."""


@dataclass(frozen=True)
class Sandbox:
    """What the benchmark needs from DIR/env, plus the p11-kit server started for it."""

    env: dict[str, str]
    p11kit_client: str = ""  # path of p11-kit-client.so
    p11kit_address: str = ""  # P11_KIT_SERVER_ADDRESS of the running `p11-kit server`

    def module_path(self, module: str) -> str:
        if module == "direct":
            return self.env["P11GRID_DIRECT_MODULE"]
        if module == "p11kit":
            return self.p11kit_client
        return self.env["P11GRID_MODULE"]

    def token(self, module: str) -> str:
        if module in ("direct", "p11kit"):
            return self.env["P11GRID_DIRECT_TOKEN"]
        return self.env["P11GRID_TOKEN"]

    def module_env(self, module: str) -> dict[str, str]:
        """What a run of this module sets on top of the sandbox's environment."""
        if module == "p11kit":
            return {"P11_KIT_SERVER_ADDRESS": self.p11kit_address}
        if module == "local":
            return {"P11GRID_CONF": self.env["P11GRID_LOCAL_CONF"]}
        return {}  # grid: P11GRID_CONF as the sandbox exports it (backend = "grid")

    @property
    def pin(self) -> str:
        return self.env["P11GRID_PIN"]


@dataclass(frozen=True)
class Config:
    module: str
    mech: str
    threads: int

    def describe(self) -> str:
        return f"{self.module:<7} {self.mech:<3} threads={self.threads}"


@dataclass(frozen=True)
class RunResult:
    config: Config
    ok: bool
    ops: int = 0
    seconds: float = 0.0
    ops_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    errors: int = 0
    detail: str = ""


@dataclass(frozen=True)
class Summary:
    config: Config
    runs: tuple[RunResult, ...]

    @property
    def good(self) -> list[RunResult]:
        """Runs that produced figures (possibly with errors counted)."""
        return [r for r in self.runs if r.ok]

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def complete(self) -> bool:
        """Every run produced figures and none reported an error."""
        return bool(self.runs) and all(r.ok and r.errors == 0 for r in self.runs)

    def median(self, field: str) -> float | None:
        values = [float(getattr(r, field)) for r in self.good]
        return statistics.median(values) if values else None


def log(message: str) -> None:
    try:
        print(f"bench: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr gone (e.g. piped into `head`): keep going so that cleanup still runs


# --- build ------------------------------------------------------------------------------


def ensure_binary() -> None:
    """Compile p11bench when the binary is missing or older than its source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    tmp = BINARY.with_suffix(".tmp")
    cmd = [cc, *CC_FLAGS, "-o", str(tmp), str(SOURCE), "-ldl"]
    log("compiling " + " ".join(cmd))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SetupError(f"compiling p11bench failed:\n{proc.stdout}{proc.stderr}")
    tmp.replace(BINARY)


# --- sandbox ------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """Source a shell file of `export NAME=value` lines through bash, in a clean environment."""
    if not path.is_file():
        raise SetupError(f"{path} does not exist")
    script = 'set -a && . "$1" && env -0'
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script, "bash", str(path)],
        check=False,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    if proc.returncode != 0:
        raise SetupError(f"sourcing {path} failed: {proc.stderr.decode(errors='replace')}")
    values: dict[str, str] = {}
    for entry in proc.stdout.split(b"\0"):
        name, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            values[name] = value
    missing = [name for name in ENV_NAMES if not values.get(name)]
    if missing:
        raise SetupError(f"{path} does not set {', '.join(missing)}")
    return {
        name: value
        for name, value in values.items()
        if name not in ("PATH", "PWD", "SHLVL", "_", "OLDPWD")
    }


def run_sandbox_cmd(p11grid: Path, action: str, directory: Path) -> None:
    cmd = [str(p11grid), "sandbox", action, str(directory)]
    log(" ".join(cmd))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SetupError(
            f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )


@contextmanager
def sandbox(p11grid: Path) -> Iterator[Sandbox]:
    """A fresh sandbox in a temp directory, brought down (and removed) afterwards."""
    if not p11grid.exists():
        raise SetupError(f"{p11grid} not found (is the virtualenv installed?)")
    parent = Path(tempfile.mkdtemp(prefix="p11grid-bench-"))
    directory = parent / "sandbox"
    try:
        run_sandbox_cmd(p11grid, "up", directory)
        yield Sandbox(read_env_file(directory / "env"))
    finally:
        # Also after a failed `up`: it may have started something before failing.
        if directory.exists():
            try:
                run_sandbox_cmd(p11grid, "down", directory)
            except (SetupError, subprocess.TimeoutExpired) as exc:
                log(f"warning: sandbox down failed: {exc}")
        shutil.rmtree(parent, ignore_errors=True)


# --- p11-kit remoting ------------------------------------------------------------------


def find_p11kit_client() -> str:
    """p11-kit-client.so: where pkg-config says p11-kit modules live, else the usual places."""
    candidates: list[Path] = []
    module_dir = command_output(["pkg-config", "--variable=p11_module_path", "p11-kit-1"])
    if module_dir != "unknown":
        candidates.append(Path(module_dir) / P11KIT_CLIENT_NAME)
    multiarch = command_output(["gcc", "-print-multiarch"])
    if multiarch != "unknown":
        candidates.append(Path("/usr/lib") / multiarch / "pkcs11" / P11KIT_CLIENT_NAME)
    candidates += sorted(Path("/usr/lib").glob(f"*/pkcs11/{P11KIT_CLIENT_NAME}"))
    candidates.append(Path("/usr/lib/pkcs11") / P11KIT_CLIENT_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise SetupError(
        f"{P11KIT_CLIENT_NAME} not found (apt-get install {P11KIT_PACKAGE}); looked in "
        + ", ".join(str(c) for c in dict.fromkeys(candidates))
    )


def server_env(box: Sandbox) -> dict[str, str]:
    """`p11-kit server` loads SoftHSM2: it needs SOFTHSM2_CONF, and no sandbox OpenSSL config."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in DROPPED_ENV
        and not name.startswith(("P11GRID_", "SOFTHSM2_", "P11_KIT_SERVER_"))
    }
    env["SOFTHSM2_CONF"] = box.env["SOFTHSM2_CONF"]
    return env


def read_server_address(stdout: Path) -> str | None:
    """The address from the `P11_KIT_SERVER_ADDRESS=...; export ...;` line, once printed."""
    try:
        text = stdout.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, sep, rest = line.partition("=")
        if sep and name.strip() == "P11_KIT_SERVER_ADDRESS":
            return rest.split(";", 1)[0].strip().strip("'\"")
    return None


def stop_process(proc: subprocess.Popen[bytes], name: str, deadline: float = 10.0) -> None:
    """SIGTERM our child, SIGKILL it after the deadline."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        log(f"warning: {name} (pid {proc.pid}) ignored SIGTERM; killing it")
        proc.kill()
        proc.wait()


@contextmanager
def p11kit_server(box: Sandbox) -> Iterator[Sandbox]:
    """`p11-kit server -f` in front of the sandbox's token, its socket in a temp directory.

    Yields the sandbox with p11-kit-client.so and the server's address filled in; stops the
    server (our child, by pid) afterwards.
    """
    client = find_p11kit_client()
    p11kit = shutil.which("p11-kit")
    if p11kit is None:
        raise SetupError("the `p11-kit` command is not installed (apt-get install p11-kit)")
    with tempfile.TemporaryDirectory(prefix="p11grid-bench-p11kit-") as tmp:
        directory = Path(tmp)  # mode 0700: only we can reach the socket
        socket_path = directory / "server.sock"
        stdout_path = directory / "server.out"
        stderr_path = directory / "server.err"
        token = urllib.parse.quote(box.token("p11kit"), safe="")
        cmd = [
            p11kit,
            "server",
            "--foreground",
            "--name",
            str(socket_path),
            "--provider",
            box.env["P11GRID_DIRECT_MODULE"],
            f"pkcs11:token={token}",
        ]
        log(" ".join(cmd))
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=server_env(box)
            )
        try:
            address = None
            give_up = time.monotonic() + P11KIT_START_TIMEOUT
            while time.monotonic() < give_up and proc.poll() is None:
                address = read_server_address(stdout_path)
                if address is not None and socket_path.exists():
                    break
                time.sleep(0.05)
            if proc.poll() is not None or address is None or not socket_path.exists():
                why = stderr_path.read_text(errors="replace").strip() or "no message"
                state = (
                    f"exited with {proc.returncode}"
                    if proc.poll() is not None
                    else f"printed no address within {P11KIT_START_TIMEOUT:g} s"
                )
                raise SetupError(f"`{' '.join(cmd)}` {state}: {why}")
            log(f"p11-kit server (pid {proc.pid}) at {address}; client {client}")
            yield replace(box, p11kit_client=client, p11kit_address=address)
        finally:
            stop_process(proc, "p11-kit server")
            leftover = stderr_path.read_text(errors="replace").strip()
            if leftover:
                for line in leftover.splitlines()[-5:]:
                    log(f"  p11-kit server | {line}")


# --- runs -------------------------------------------------------------------------------


def bench_command(box: Sandbox, config: Config, seconds: float, warmup: float) -> list[str]:
    return [
        str(BINARY),
        "--module",
        box.module_path(config.module),
        "--token",
        box.token(config.module),
        "--pin",
        box.pin,
        "--key",
        KEY_LABELS[config.mech],
        "--mech",
        config.mech,
        "--threads",
        str(config.threads),
        "--seconds",
        f"{seconds:g}",
        "--warmup",
        f"{warmup:g}",
        "--max-ops",
        "2000000",
    ]


# The sandbox's OPENSSL_CONF loads the libp11 engine on libp11grid.so; SoftHSM's libcrypto
# reads OPENSSL_CONF, so passing it on would load that engine into the direct runs too.
# Every run uses the system OpenSSL configuration instead.
DROPPED_ENV = frozenset({"OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES"})


def child_env(box: Sandbox, module: str) -> dict[str, str]:
    """The environment of p11bench: ours, minus stale sandbox settings, plus the sandbox's,
    plus what this module needs (the p11-kit server's address, the local config)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in DROPPED_ENV
        and not name.startswith(("P11GRID_", "SOFTHSM2_", "P11_KIT_SERVER_"))
    }
    env.update(
        (name, value)
        for name, value in box.env.items()
        if name not in DROPPED_ENV and not name.endswith("OPENSSL_CONF")
    )
    env.update(box.module_env(module))
    return env


class RunFailed(Exception):
    """A p11bench process failed or printed no result; the message says how."""


def run_p11bench(cmd: Sequence[str], env: Mapping[str, str], timeout: float) -> dict[str, Any]:
    """Run one p11bench process and return its JSON result line, parsed."""
    try:
        proc = subprocess.run(
            list(cmd), check=False, capture_output=True, text=True, env=dict(env), timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise RunFailed("timed out") from None
    stderr = proc.stderr.strip()
    if proc.returncode != 0:
        last = stderr.splitlines()[-1] if stderr else "no message"
        raise RunFailed(f"exit {proc.returncode}: {last}")
    for line in stderr.splitlines():
        log(f"  | {line}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RunFailed("no JSON result line")
    try:
        data = json.loads(lines[-1])
    except ValueError as exc:
        raise RunFailed(f"bad JSON result: {exc}: {lines[-1]}") from None
    if not isinstance(data, dict):
        raise RunFailed(f"bad JSON result: {lines[-1]}")
    return data


def run_one(box: Sandbox, config: Config, seconds: float, warmup: float) -> RunResult:
    cmd = bench_command(box, config, seconds, warmup)
    try:
        data = run_p11bench(cmd, child_env(box, config.module), seconds + warmup + 60)
    except RunFailed as exc:
        return RunResult(config, ok=False, detail=str(exc))
    try:
        return RunResult(
            config,
            ok=True,
            ops=int(data["ops"]),
            seconds=float(data["seconds"]),
            ops_per_s=float(data["ops_per_s"]),
            p50_us=float(data["p50_us"]),
            p99_us=float(data["p99_us"]),
            errors=int(data["errors"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        return RunResult(config, ok=False, detail=f"bad JSON result: {exc}: {data}")


def schedule(repeats: int) -> list[Config]:
    """Each configuration `repeats` times; its modules back to back, in an order rotated by
    one place per configuration and per repeat, so no module always runs first or last."""
    order: list[Config] = []
    for rep in range(repeats):
        for index, (mech, threads) in enumerate((m, t) for m in MECHS for t in THREADS):
            shift = (index + rep) % len(MODULES)
            modules = MODULES[shift:] + MODULES[:shift]
            order.extend(Config(module, mech, threads) for module in modules)
    return order


def run_all(box: Sandbox, repeats: int, seconds: float, warmup: float) -> dict[Config, Summary]:
    plan = schedule(repeats)
    results: dict[Config, list[RunResult]] = {}
    for index, config in enumerate(plan, start=1):
        result = run_one(box, config, seconds, warmup)
        results.setdefault(config, []).append(result)
        if result.ok:
            status = (
                f"{result.ops_per_s:10.1f} ops/s  p50 {result.p50_us:8.1f} us"
                f"  p99 {result.p99_us:8.1f} us  errors {result.errors}"
            )
        else:
            status = f"FAILED ({result.detail})"
        log(f"[{index:2d}/{len(plan)}] {config.describe()}  {status}")
    return {config: Summary(config, tuple(runs)) for config, runs in results.items()}


# --- cold start -------------------------------------------------------------------------

# Issue 4: a fresh process from C_Initialize to its first signature, through the grid with
# the identity gate; the other modules for reference.
COLD_MODULES = ("grid", "local", "direct", "p11kit")
COLD_MECH = "ec"
COLD_NEXT = 20  # signatures timed after the first, in the same process
COLD_TARGET_S = 0.3
# p11bench --cold's figures (ms), in call order; cold_ms is C_Initialize to the first C_Sign.
COLD_PHASES = (
    ("initialize_ms", "C_Initialize"),
    ("slot_ms", "slot lookup"),
    ("open_session_ms", "C_OpenSession"),
    ("login_ms", "C_Login"),
    ("find_key_ms", "find key"),
    ("sign_init_ms", "C_SignInit"),
    ("sign_ms", "first C_Sign"),
)
COLD_FIGURES = ("dlopen_ms", *(name for name, _ in COLD_PHASES), "cold_ms", "next_p50_us")


@dataclass(frozen=True)
class ColdResult:
    module: str
    ok: bool
    figures: Mapping[str, float]  # COLD_FIGURES, as p11bench printed them
    errors: int = 0
    detail: str = ""


@dataclass(frozen=True)
class ColdSummary:
    module: str
    runs: tuple[ColdResult, ...]

    def values(self, name: str) -> list[float]:
        return [r.figures[name] for r in self.runs if r.ok]

    def median(self, name: str) -> float | None:
        values = self.values(name)
        return statistics.median(values) if values else None

    def p90(self, name: str) -> float | None:
        values = self.values(name)
        return quantile(values, 0.9) if values else None

    @property
    def complete(self) -> bool:
        return bool(self.runs) and all(r.ok and r.errors == 0 for r in self.runs)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks: with 9 runs, p90 is not just the max."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_cold(box: Sandbox, module: str) -> ColdResult:
    cmd = [
        str(BINARY),
        "--cold",
        "--next",
        str(COLD_NEXT),
        "--module",
        box.module_path(module),
        "--token",
        box.token(module),
        "--pin",
        box.pin,
        "--key",
        KEY_LABELS[COLD_MECH],
        "--mech",
        COLD_MECH,
    ]
    try:
        data = run_p11bench(cmd, child_env(box, module), 60)
        figures = {name: float(data[name]) for name in COLD_FIGURES}
        return ColdResult(module, ok=True, figures=figures, errors=int(data["errors"]))
    except RunFailed as exc:
        return ColdResult(module, ok=False, figures={}, detail=str(exc))
    except (ValueError, KeyError, TypeError) as exc:
        return ColdResult(module, ok=False, figures={}, detail=f"bad JSON result: {exc}")


def run_cold_all(box: Sandbox, runs: int) -> dict[str, ColdSummary]:
    """`runs` fresh processes per module, the modules' order rotated by one each round."""
    results: dict[str, list[ColdResult]] = {module: [] for module in COLD_MODULES}
    total = runs * len(COLD_MODULES)
    index = 0
    for rep in range(runs):
        shift = rep % len(COLD_MODULES)
        for module in COLD_MODULES[shift:] + COLD_MODULES[:shift]:
            index += 1
            result = run_cold(box, module)
            results[module].append(result)
            if result.ok:
                status = (
                    f"cold {result.figures['cold_ms']:7.1f} ms  (C_Initialize"
                    f" {result.figures['initialize_ms']:6.1f}, C_Login"
                    f" {result.figures['login_ms']:6.1f})  errors {result.errors}"
                )
            else:
                status = f"FAILED ({result.detail})"
            log(f"[cold {index:2d}/{total}] {module:<7} {status}")
    return {module: ColdSummary(module, tuple(runs)) for module, runs in results.items()}


# --- requests per signature, counted ------------------------------------------------------

# Issue 4: through the grid with the identity gate, (signatures, threads) per fresh process;
# the first two differ only in N, which is what the verdict compares.
COUNT_PLAN = ((200, 1), (2000, 1), (2000, 2))
COUNT_MECH = "ec"
LOG_SETTLE_S = 0.3  # the grid writes an audit line after its reply: wait for the last ones
LOG_SETTLE_LIMIT_S = 5.0


class LogTail:
    """The lines a log file gains from now on (the sandbox's logs only grow)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size if self.path is not None else 0
        except OSError:
            return 0

    def new_lines(self) -> list[str] | None:
        """The lines written since, once the file stopped growing; None: no file to read."""
        if self.path is None or not self.path.exists():
            return None
        size, stable_since = self._size(), time.monotonic()
        give_up = stable_since + LOG_SETTLE_LIMIT_S
        while time.monotonic() < give_up:
            time.sleep(0.05)
            now = self._size()
            if now != size:
                size, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= LOG_SETTLE_S:
                break
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        return data.decode(errors="replace").splitlines()


def audit_log_path(box: Sandbox) -> Path | None:
    """The grid's audit log, from the grid service's own configuration."""
    table = read_toml(box.env.get("P11GRID_GRID_CONF", "")).get("grid", {})
    path = table.get("audit_log") if isinstance(table, dict) else None
    return Path(path) if isinstance(path, str) else None


def idp_log_path(box: Sandbox) -> Path | None:
    """The OpenID provider's log, from its configuration in the sandbox (DIR/identity)."""
    directory = box.env.get("P11GRID_SANDBOX")
    if not directory:
        return None
    table = read_toml(str(Path(directory) / "identity" / "idp.toml")).get("idp", {})
    path = table.get("log_file") if isinstance(table, dict) else None
    return Path(path) if isinstance(path, str) else None


def read_toml(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text()) if path else {}
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def identity_table(box: Sandbox) -> dict[str, Any] | None:
    """The grid module configuration's [identity] table (None: no identity gate)."""
    table = read_toml(box.env["P11GRID_CONF"]).get("identity")
    return table if isinstance(table, dict) else None


def audit_ops(lines: Sequence[str]) -> tuple[dict[str, int], int]:
    """Audit lines by operation, and how many of them did not end "ok"."""
    ops: dict[str, int] = {}
    refused = 0
    for line in lines:
        start = line.find("{")
        try:
            entry = json.loads(line[start:]) if start >= 0 else None
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            continue
        op = str(entry.get("op", "?"))
        ops[op] = ops.get(op, 0) + 1
        refused += entry.get("result") != "ok"
    return ops, refused


def strace_works() -> bool:
    """Whether strace can follow our children here (ptrace may be forbidden)."""
    if shutil.which("strace") is None:
        return False
    probe = [*strace_prefix(Path("/dev/null")), "true"]
    try:
        return subprocess.run(probe, check=False, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def strace_prefix(output: Path) -> list[str]:
    # Only connect(), filtered in the kernel: the counted run is not timed anyway.
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-e",
            "signal=none", "-o", str(output)]


def connections_to(trace: Path, port: int | None) -> int | None:
    """connect() calls to a loopback TCP port in an strace output (one per connection)."""
    if port is None:
        return None
    try:
        text = trace.read_text(errors="replace")
    except OSError:
        return None
    return text.count(f"sin_port=htons({port}),")


@dataclass(frozen=True)
class CountResult:
    signatures: int  # timed signatures asked for; each thread signs once more to size its buffer
    threads: int
    ok: bool
    ops: Mapping[str, int]  # the grid's audit lines of this run, by operation
    refused: int = 0  # audit lines of this run not ending "ok"
    idp_tokens: int = 0  # token requests in the OpenID provider's log
    idp_connections: int | None = None  # the host's connect()s to the provider (strace)
    grid_connections: int | None = None  # ... and to the grid
    detail: str = ""

    @property
    def signed(self) -> int:
        return self.ops.get("sign", 0)

    @property
    def identity_requests(self) -> int:
        """What the identity layer sent: `authorize` at the grid, token requests at the IdP."""
        return self.ops.get("authorize", 0) + self.idp_tokens


def run_count(box: Sandbox, signatures: int, threads: int, traced: bool) -> CountResult:
    """One grid-path process signing exactly `signatures` times (no warm-up, no time bound);
    what it caused, counted in the grid's audit log, the IdP's log and its connect()s."""
    audit = LogTail(audit_log_path(box))
    idp = LogTail(idp_log_path(box))
    cmd = [
        str(BINARY), "--module", box.module_path("grid"), "--token", box.token("grid"),
        "--pin", box.pin, "--key", KEY_LABELS[COUNT_MECH], "--mech", COUNT_MECH,
        "--threads", str(threads), "--warmup", "0", "--seconds", "600",
        "--max-ops", str(signatures),
    ]
    with tempfile.TemporaryDirectory(prefix="p11grid-bench-count-") as tmp:
        trace = Path(tmp) / "connect.trace"
        try:
            data = run_p11bench([*strace_prefix(trace), *cmd] if traced else cmd,
                                child_env(box, "grid"), 300)
            run_ok = int(data["errors"]) == 0 and int(data["ops"]) == signatures
            detail = "" if run_ok else f"ops {data['ops']} of {signatures}, errors {data['errors']}"
        except RunFailed as exc:
            run_ok, detail = False, str(exc)
        except (ValueError, KeyError, TypeError) as exc:
            run_ok, detail = False, f"bad JSON result: {exc}"
        idp_port = urllib.parse.urlsplit(box.env.get("P11GRID_IDP_URL", "")).port
        grid_port = box.env["P11GRID_GRID_ADDR"].rpartition(":")[2]
        idp_connections = connections_to(trace, idp_port) if traced else None
        grid_connections = (
            connections_to(trace, int(grid_port)) if traced and grid_port.isdigit() else None
        )
    audit_lines, idp_lines = audit.new_lines(), idp.new_lines()
    if audit_lines is None or idp_lines is None:
        missing = audit.path if audit_lines is None else idp.path
        return CountResult(signatures, threads, ok=False, ops={},
                           detail=f"no log to count in ({missing})")
    ops, refused = audit_ops(audit_lines)
    return CountResult(
        signatures, threads, ok=run_ok, ops=ops, refused=refused,
        idp_tokens=sum("token request from" in line for line in idp_lines),
        idp_connections=idp_connections, grid_connections=grid_connections, detail=detail,
    )


def run_counts(box: Sandbox) -> list[CountResult]:
    traced = strace_works()
    if not traced:
        log("strace is not usable here: connections to the IdP and the grid are not counted")
    results = []
    for index, (signatures, threads) in enumerate(COUNT_PLAN, start=1):
        result = run_count(box, signatures, threads, traced)
        results.append(result)
        ops = ", ".join(f"{op} {n}" for op, n in sorted(result.ops.items()))
        status = "" if result.ok else f"  FAILED ({result.detail})"
        log(f"[count {index}/{len(COUNT_PLAN)}] grid    {signatures} signatures, {threads}"
            f" thread(s): audit {ops or 'nothing'}; IdP token requests {result.idp_tokens};"
            f" connections IdP {result.idp_connections}, grid {result.grid_connections}{status}")
    return results


# --- machine ------------------------------------------------------------------------------


def command_output(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if proc.returncode == 0 and text else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_first_line(path: str) -> str:
    try:
        return Path(path).read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def machine_info() -> dict[str, str]:
    return {
        "nproc": command_output(["nproc"]),
        "CPU": cpu_model(),
        "Kernel": platform.release(),
        "Debian": read_first_line("/etc/debian_version"),
        "OpenSSL": command_output(["openssl", "version"]),
        "SoftHSM": command_output(["softhsm2-util", "--version"]),
        "Python": platform.python_version(),
    }


# --- report -------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(
    summaries: Mapping[Config, Summary], mech: str, threads: int, ours: str, base: str
) -> float | None:
    """Median ops/s of module `ours` over module `base`, for one mechanism and thread count."""
    top = summaries[Config(ours, mech, threads)].median("ops_per_s")
    bottom = summaries[Config(base, mech, threads)].median("ops_per_s")
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def added_latency(
    summaries: Mapping[Config, Summary], mech: str, threads: int, module: str, field: str
) -> float | None:
    """Median latency (`p50_us`/`p99_us`) of `module` minus the direct token's."""
    ours = summaries[Config(module, mech, threads)].median(field)
    direct = summaries[Config("direct", mech, threads)].median(field)
    if ours is None or direct is None:
        return None
    return ours - direct


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_added(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+,.0f}"


@dataclass(frozen=True)
class Target:
    description: str
    measured: str
    passed: bool | None  # None: not measurable (runs failed)

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "MISS")


def evaluate_targets(summaries: Mapping[Config, Summary]) -> list[Target]:
    targets: list[Target] = []
    # Issue 2: the module with the token in-process.
    for mech, minimum in RATIO_TARGETS.items():
        value = ratio(summaries, mech, 1, "local", "direct")
        targets.append(
            Target(
                f"{MECH_TITLES[mech]}, 1 thread: libp11grid local >= {minimum:g}x direct ops/s",
                fmt_ratio(value),
                None if value is None else value >= minimum,
            )
        )
    for mech in MECHS:
        one = summaries[Config("local", mech, 1)].median("ops_per_s")
        two = summaries[Config("local", mech, 2)].median("ops_per_s")
        measured = "n/a" if one is None or two is None else f"{two:,.1f} vs {one:,.1f} ops/s"
        targets.append(
            Target(
                f"{MECH_TITLES[mech]}: libp11grid local at 2 threads >= at 1 thread",
                measured,
                None if one is None or two is None else two >= one,
            )
        )
    # Issue 3: the module through the grid against p11-kit's remoting of the same token.
    for mech, minimum in REMOTE_TARGETS.items():
        for threads in THREADS:
            value = ratio(summaries, mech, threads, "grid", "p11kit")
            plural = "thread" if threads == 1 else "threads"
            targets.append(
                Target(
                    f"{MECH_TITLES[mech]}, {threads} {plural}: libp11grid → grid"
                    f" >= {minimum:g}x p11-kit remoting ops/s",
                    fmt_ratio(value),
                    None if value is None else value >= minimum,
                )
            )
    return targets


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def per_signature(count: int, result: CountResult) -> str:
    return "n/a" if result.signed <= 0 else f"{count / result.signed:.4f}"


def startup_targets(
    cold: Mapping[str, ColdSummary], counts: Sequence[CountResult], identity: bool
) -> list[Target]:
    grid = cold["grid"]
    median, p90 = grid.median("cold_ms"), grid.p90("cold_ms")
    cold_target = Target(
        f"Cold start, {MODULE_TITLES['grid']} with the identity gate"
        f" ({MECH_TITLES[COLD_MECH]}): median `C_Initialize` → first `C_Sign`"
        f" < {COLD_TARGET_S:g} s",
        "n/a"
        if median is None or p90 is None
        else f"{median / 1000:.3f} s (p90 {p90 / 1000:.3f} s, {len(grid.values('cold_ms'))} runs)",
        None if median is None else median < COLD_TARGET_S * 1000,
    )
    small, large = counts[0], counts[1]  # COUNT_PLAN: the same threads, N differs
    description = (
        f"Identity layer: no network round trip per signature (`authorize` + IdP token"
        f" requests the same at {small.signatures:,} and {large.signatures:,} signatures;"
        " counted)"
    )
    if not identity:
        count_target = Target(description, "no `[identity]` in the module configuration", None)
    elif not (small.ok and large.ok):
        count_target = Target(description, "n/a (a counted run failed)", None)
    else:
        same = (
            small.identity_requests == large.identity_requests
            and small.idp_connections == large.idp_connections
        )
        connections = (
            ""
            if small.idp_connections is None or large.idp_connections is None
            else f"; IdP connections {small.idp_connections} and {large.idp_connections}"
        )
        count_target = Target(
            description,
            f"{small.identity_requests} and {large.identity_requests} requests"
            f" ({per_signature(small.identity_requests, small)} →"
            f" {per_signature(large.identity_requests, large)} per signature){connections}",
            same and small.ops.get("authorize", 0) >= 1,
        )
    return [cold_target, count_target]


def identity_description(table: Mapping[str, Any] | None) -> str:
    """How the configured gate gets its tokens, in a few words."""
    if table is None:
        return "none: the module configuration has no `[identity]` table"
    token = (
        "the VM-Auth-Token file `vm_token` (Option 2)"
        if table.get("vm_token")
        else "the VM-Auth-Token the provider recorded for `vm` (Option 1)"
    )
    auth = (
        "`private_key_jwt` signed with the hypervisor's key inside its PKCS#11 token"
        f" (in `{table.get('hv_module', '?')}`)"
        if table.get("hv_key")
        else "`tls_client_auth` with the hypervisor's key file"
    )
    return f"{token}, authenticated to the OpenID provider with {auth}"


def gate_steps(table: Mapping[str, Any] | None) -> list[str]:
    """Step 2 of the grid path's cold start: what the configured identity gate does."""
    if table is None:
        text = (
            "2. No identity gate (no `[identity]` in the module configuration): the first"
            " call that needs the element (`C_Login` here) goes straight to the grid."
        )
    else:
        verify = (
            "**verifies the VM-Auth-Token** (chain to the IAM root and its CRL, the"
            " hypervisor's signature, audience, lifetime, `cnf` = this VM's certificate)"
        )
        second = (
            "a **second TLS connection to the IdP** (the provider closes each connection"
            " after its answer)"
        )
        auth = (
            "loads the hypervisor's PKCS#11 library and logs in to its token, where the"
            " client assertion (`private_key_jwt`) is **signed by the HV key**"
            if table.get("hv_key")
            else "authenticates with the hypervisor's certificate and key file in the TLS"
            " handshake (`tls_client_auth`)"
        )
        if table.get("vm_token"):
            exchange = (
                f"{verify} before anything leaves the VM; {auth}; and exchanges the"
                f" VM-Auth-Token for an access token (RFC 8693) over {second}"
            )
        else:
            exchange = (
                f"{auth}; asks over {second} for the VM-Auth-Token recorded for this VM,"
                f" which comes with an access token; and {verify}"
            )
        text = (
            "2. The first call that needs the element (`C_Login` here, or"
            " `C_FindObjectsInit`) runs the **identity gate** first. It imports `idm` and"
            " `cryptography`; fetches the provider's discovery document"
            " (a **TLS handshake to the IdP** and an HTTPS GET); "
            + exchange
            + "."
        )
    return textwrap.wrap(text, width=88, subsequent_indent="   ")


def cold_section(
    cold: Mapping[str, ColdSummary], runs: int, table: Mapping[str, Any] | None
) -> list[str]:
    lines = [
        "",
        "## Cold start: `C_Initialize` to the first signature",
        "",
        f"Each run is a fresh `p11bench --cold` process ({MECH_TITLES[COLD_MECH]}, one",
        "session): the wall time from just before `C_Initialize` to the return of the first",
        "successful `C_Sign`, through the slot lookup (`C_GetSlotList`, `C_GetTokenInfo`),",
        "`C_OpenSession`, `C_Login` as user, finding the key (`C_FindObjects*`) and",
        "`C_SignInit`; the first `C_Sign` goes into a buffer large enough (no length query).",
        "Loading the library (`dlopen`) is shown apart and not included. The process then",
        f"signs {COLD_NEXT} more times on its open session: **next signature p50** is what",
        "an operation costs once the session is open (the steady-state tables above measure",
        f"the same over seconds). {runs} processes per module, the modules' order rotated by",
        "one place each round; the grid service, the OpenID provider and the p11-kit server",
        "are already running, and the files are in the page cache. p90 interpolates between",
        "the closest ranks.",
        "",
        "| Module | median ms | p90 ms | min-max ms | next signature p50 µs | ms of each run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for module in COLD_MODULES:
        summary = cold[module]
        values = summary.values("cold_ms")
        spread = f"{min(values):,.1f}-{max(values):,.1f}" if values else "n/a"
        each = ", ".join(
            f"{r.figures['cold_ms']:,.0f}" if r.ok else "failed" for r in summary.runs
        )
        lines.append(
            f"| {MODULE_TITLES[module]} | {fmt_ms(summary.median('cold_ms'))}"
            f" | {fmt_ms(summary.p90('cold_ms'))} | {spread}"
            f" | {fmt(summary.median('next_p50_us'))} | {each} |"
        )
    lines += [
        "",
        "Where the time goes (median ms of each step; the steps add up to the cold start):",
        "",
        "| Module | `dlopen` (not counted) | "
        + " | ".join(title for _, title in COLD_PHASES)
        + " |",
        "|---|" + "---:|" * (len(COLD_PHASES) + 1),
    ]
    for module in COLD_MODULES:
        summary = cold[module]
        cells = [fmt_ms(summary.median(name)) for name, _ in COLD_PHASES]
        lines.append(
            f"| {MODULE_TITLES[module]} | {fmt_ms(summary.median('dlopen_ms'))}"
            f" | {' | '.join(cells)} |"
        )
    lines += [
        "",
        "What the grid path does before its first signature:",
        "",
        "1. `C_Initialize` starts the module's embedded Python interpreter, imports the",
        "   provider and reads `P11GRID_CONF`; nothing goes over the network (the local",
        "   path pays the same).",
        *gate_steps(table),
        "3. Then the grid: a **mutual-TLS 1.3 handshake** with the VM's certificate (the",
        "   connection then stays in the pool), `authorize` with the access token and the",
        "   VM-Auth-Token (the grid checks the three elements itself, against the provider's",
        "   JWKS it already holds: no call to the IdP), `objects` (the element's public",
        "   objects and mechanisms, cached by the module) and `login` (the element's user",
        "   login, behind the grid's own PIN check).",
        "4. Finding the key and `C_SignInit` are answered from the module's cache; the first",
        "   `C_Sign` is one `sign` request on the pooled connection.",
        "",
        "The reference rows: libp11grid local pays step 1 and a `C_Login` on SoftHSM2",
        "in-process; SoftHSM2 direct is the token alone; p11-kit's client connects to the",
        "server's unix socket, whose server starts a `p11-kit-remote` that loads SoftHSM2.",
    ]
    return lines


def counts_section(counts: Sequence[CountResult], identity: bool) -> list[str]:
    gate = "with the identity gate" if identity else "without an identity gate (no `[identity]`)"
    intro = (
        f"Each row is one fresh `p11bench` process on {MODULE_TITLES['grid']} {gate},"
        f" {MECH_TITLES[COUNT_MECH]}, no warm-up and no time bound: exactly N signatures,"
        " plus one per thread that sizes its buffer. Counted for that process: the grid's"
        " audit lines (one per request; `objects`, fetched once when the element opens, is"
        " not audited), the token requests in the OpenID provider's log, and the host"
        " process's `connect()` calls (`strace -e trace=connect`) to the provider (each one"
        " HTTPS request: discovery or token) and to the grid (its connections are pooled"
        " and persistent). **Identity requests** are `authorize` plus the IdP token"
        " requests; per signature divides by the `sign` lines."
    )
    lines = [
        "",
        "## Requests per signature through the grid (counted, not timed)",
        "",
        *textwrap.wrap(intro, width=88),
        "",
        "| N | threads | `sign` | `authorize` | `login` | other audited | IdP token requests"
        " | connections IdP / grid | identity requests | identity requests per signature"
        " | grid requests per signature |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for result in counts:
        others = ", ".join(
            f"{op} {n}"
            for op, n in sorted(result.ops.items())
            if op not in ("sign", "authorize", "login")
        )
        connections = (
            "n/a"
            if result.idp_connections is None or result.grid_connections is None
            else f"{result.idp_connections} / {result.grid_connections}"
        )
        failed = "" if result.ok else f" (failed: {result.detail})"
        lines.append(
            f"| {result.signatures:,}{failed} | {result.threads} | {result.signed:,}"
            f" | {result.ops.get('authorize', 0)} | {result.ops.get('login', 0)}"
            f" | {others or 'none'} | {result.idp_tokens} | {connections}"
            f" | {result.identity_requests} | {per_signature(result.identity_requests, result)}"
            f" | {per_signature(sum(result.ops.values()), result)} |"
        )
    refused = sum(result.refused for result in counts)
    if refused:
        lines += ["", f"**{refused} audit line(s) did not end `ok`**: see the grid's audit log."]
    measured = "; ".join(
        f"{r.identity_requests} at N = {r.signatures:,} on {r.threads} thread(s)" for r in counts
    )
    closing = (
        "By design the identity layer's requests are made when an element is first reached,"
        " once per process and element (the sessions of all threads share its"
        " authorization), and again only shortly before that authorization ends (with the"
        " first of its tokens), whatever the signing rate: per signature they tend to 0, and"
        f" each signature is one `sign` request to the grid. Measured identity requests:"
        f" {measured}. Target: the same identity requests (and IdP connections) for both N"
        " at 1 thread."
    )
    return [*lines, "", *textwrap.wrap(closing, width=88)]


def gate_text(table: Mapping[str, Any] | None, identity: str) -> list[str]:
    """The grid path's identity gate, for "What is measured" (list item 4, indented)."""
    if table is None:
        text = f"**Identity gate**: {identity}."
    else:
        text = (
            "**Identity gate**: the module configuration has an `[identity]` table, so"
            " before its first request on an element (at the first `C_Login` or"
            " `C_FindObjectsInit`) the module verifies the sandbox's VM-Auth-Token, gets an"
            " access token for the grid from the sandbox's OpenID provider (`p11grid idp"
            " serve`, HTTPS on loopback) and presents both to the grid's `authorize`; every"
            " later request carries that authorization, renewed shortly before it ends."
            f" Tokens: {identity}. In the steady-state runs this happens during setup,"
            " outside the timed window; its cost is in **Cold start** and its requests in"
            " **Requests per signature**."
        )
    return textwrap.wrap(text, width=88, initial_indent="   ", subsequent_indent="   ")


def scale_targets(scaled: scale.ScaleResults | None) -> list[Target]:
    if scaled is None:
        return []
    return [Target(v.description, v.measured, v.passed) for v in scale.verdicts(scaled)]


def render_scale_only(
    scaled: scale.ScaleResults, started: dt.datetime, load_before: str
) -> str:
    """The report of `--only scale`: the machine, the scale section, its targets."""
    lines = [
        "# Benchmarks: the scale part alone",
        "",
        "Generated by `.venv/bin/python bench/run.py --only scale`; `make bench` writes the",
        "full report (docs/BENCHMARKS.md) with this part in it.",
        "",
        "## Machine",
        "",
        f"- Run: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        *(f"- {name}: {value}" for name, value in machine_info().items()),
        f"- Load average (1/5/15 min) before the run: {load_before}",
        *scale.section(scaled),
        "",
        "## Targets",
        "",
        "| Target | Measured | Result |",
        "|---|---|---|",
        *(f"| {t.description} | {t.measured} | {t.verdict} |" for t in scale_targets(scaled)),
    ]
    if scaled.failures:
        lines += ["", "## Failed runs", "", *(f"- {line}" for line in scaled.failures)]
    return "\n".join([*lines, ""])


def render_report(
    summaries: Mapping[Config, Summary],
    cold: Mapping[str, ColdSummary],
    counts: Sequence[CountResult],
    table: Mapping[str, Any] | None,
    box: Sandbox,
    repeats: int,
    seconds: float,
    warmup: float,
    cold_runs: int,
    started: dt.datetime,
    load_before: str,
    scaled: scale.ScaleResults | None = None,
) -> str:
    info = machine_info()
    identity = identity_description(table)
    lines: list[str] = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`.venv/bin/python bench/run.py`); do not edit by hand,",
        "re-run the command instead.",
        "",
        "## What is measured",
        "",
        "Signing throughput and latency of four ways to reach the same SoftHSM2 token of a",
        "fresh `p11grid sandbox` (keys `vm-rsa`, RSA-2048, and `vm-ec`, EC P-256), the time",
        "a fresh process takes from `C_Initialize` to its first signature, and the requests",
        "each signature causes through the grid, counted:",
        "",
        "1. **SoftHSM2 direct**: `libsofthsm2.so` loaded by the host, the baseline;",
        "2. **p11-kit remoting**: `p11-kit-client.so` in the host, talking p11-kit's RPC",
        "   protocol over a **unix socket** (in a private temp directory) to",
        "   `p11-kit server --foreground --provider libsofthsm2.so \"pkcs11:token=vm-se\"`,",
        "   started by the benchmark with the sandbox's `SOFTHSM2_CONF`; the server runs a",
        "   `p11-kit-remote` process per client connection, which loads SoftHSM2;",
        "3. **libp11grid local**: `build/libp11grid.so` with the sandbox's",
        "   `P11GRID_LOCAL_CONF` (`backend = \"local\"`): SoftHSM2 driven inside the host",
        "   process by the module's embedded Python;",
        "4. **libp11grid → grid**: `build/libp11grid.so` with the sandbox's `P11GRID_CONF`",
        "   (`backend = \"grid\"`): each signature is one request over a pooled, persistent",
        "   **TLS 1.3** connection (mutual TLS, client certificate of the sandbox's VM",
        "   identity; length-prefixed msgpack frames, `docs/grid-protocol.md`) on",
        "   **loopback** (`127.0.0.1`) to the sandbox's grid service (`p11grid grid serve`,",
        "   a separate Python process: one reactor thread reads every connection and",
        "   makes quick element calls itself, slow ones go to worker threads), which",
        "   signs with SoftHSM2 in its own process. Each host thread polls for its",
        "   reply for up to `spin_us` (1000 µs) before sleeping, in C without the GIL and",
        "   yielding its CPU between looks, unless that kind of reply has lately taken",
        "   longer or the machine's CPUs are all busy (`docs/grid-protocol.md`).",
        *gate_text(table, identity),
        "",
        "- Host: `bench/p11bench.c`, a C program that `dlopen`s one module per process",
        "  (two modules never share a process), calls `C_Initialize` with",
        "  `CKF_OS_LOCKING_OK`, opens one `CKF_SERIAL_SESSION` per thread, logs in as user",
        "  (on the grid path, where the identity gate runs) and finds the private key by",
        "  `CKA_LABEL`; `--cold` times that start instead (below). Every run uses the",
        "  system OpenSSL configuration (the sandbox's `OPENSSL_CONF`, which loads an engine",
        "  on libp11grid, is passed neither to the host nor to the p11-kit server).",
        "- One operation is `C_SignInit` + `C_Sign` into a buffer sized once up front:",
        "  `CKM_RSA_PKCS` over a fixed 51-byte SHA-256 DigestInfo, or `CKM_ECDSA` over a",
        "  fixed 32-byte hash.",
        f"- Each run: {warmup:g} s warm-up, then {seconds:g} s timed; ops/s counts the",
        "  successful timed operations over the timed window; p50/p99 are the latencies of",
        "  single operations across all threads, as the host sees them.",
        f"- Every configuration (module x mechanism x threads) is run {repeats} times,",
        "  the four modules back to back, their order rotated by one place per",
        "  configuration and per repeat, and the **median** of the repeats is reported, so",
        "  that machine noise affects all columns alike.",
        "- The two server processes (p11-kit's and the grid service) run on the same 2",
        "  cores as the host: a remote path's throughput includes the server's CPU time.",
        f"- After the steady-state runs: {cold_runs} cold starts per module (fresh processes,",
        f"  {MECH_TITLES[COLD_MECH]}), then {len(COUNT_PLAN)} counted runs through the grid",
        "  (see their sections for the method)"
        + (", then the scale part: secure elements and grid nodes, and nginx TLS handshakes"
           " (**Scale**, its own method)." if scaled is not None else "."),
        "",
        "**Quote the ratios, not the absolute figures**: absolute ops/s and latencies",
        "depend on the machine and its load; the ratios are what the targets are about.",
        "",
        "Options: `bench/run.py --seconds S --repeats N` for longer or more runs,",
        "`--cold-runs N` for more cold starts, `--scale-repeats N` for the scale part's",
        "runs, `--only main|scale` for one part;",
        "`bench/run.py --profile [--profile-module local|grid]` runs the ECDSA 1-thread",
        "case once under `py-spy` (if installed) and writes `build/bench/profile-host.svg`",
        "(and `profile-grid.svg`, the grid service) instead.",
        "",
        "## Machine",
        "",
        f"- Run: {started.strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    lines += [f"- {name}: {value}" for name, value in info.items()]
    lines += [f"- Load average (1/5/15 min) before the run: {load_before}"]
    lines += [
        f"- Modules: libp11grid `{box.module_path('local')}`;"
        f" direct `{box.module_path('direct')}`; p11-kit client `{box.module_path('p11kit')}`",
        f"- p11-kit: {command_output(['dpkg-query', '-W', '-f=${Version}', 'p11-kit'])}",
        "",
        "## Results (median of repeats)",
        "",
        "| Mechanism | Threads | Module | ops/s | p50 µs | p99 µs | errors | ops/s of each run |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for mech in MECHS:
        for threads in THREADS:
            for module in MODULES:
                summary = summaries[Config(module, mech, threads)]
                each = ", ".join(f"{r.ops_per_s:,.0f}" if r.ok else "failed" for r in summary.runs)
                lines.append(
                    f"| {MECH_TITLES[mech]} | {threads} | {MODULE_TITLES[module]}"
                    f" | {fmt(summary.median('ops_per_s'))} | {fmt(summary.median('p50_us'))}"
                    f" | {fmt(summary.median('p99_us'))} | {summary.errors} | {each} |"
                )
    lines += [
        "",
        "## Ratios (ops/s)",
        "",
        "| Mechanism | Threads | local / direct | p11-kit / direct | grid / direct"
        " | **grid / p11-kit** |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mech in MECHS:
        for threads in THREADS:
            cells = [
                fmt_ratio(ratio(summaries, mech, threads, "local", "direct")),
                fmt_ratio(ratio(summaries, mech, threads, "p11kit", "direct")),
                fmt_ratio(ratio(summaries, mech, threads, "grid", "direct")),
                "**" + fmt_ratio(ratio(summaries, mech, threads, "grid", "p11kit")) + "**",
            ]
            lines.append(f"| {MECH_TITLES[mech]} | {threads} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Latency added to the direct token (µs per operation)",
        "",
        "The module's median p50 (p99) minus SoftHSM2 direct's, same mechanism and threads.",
        "At 2 threads it includes waiting for the other thread's operation.",
        "",
        "| Mechanism | Threads | p11-kit p50 | p11-kit p99 | grid p50 | grid p99"
        " | local p50 | local p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mech in MECHS:
        for threads in THREADS:
            cells = [
                fmt_added(added_latency(summaries, mech, threads, module, field))
                for module in (*REMOTE_MODULES, "local")
                for field in ("p50_us", "p99_us")
            ]
            lines.append(f"| {MECH_TITLES[mech]} | {threads} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Scaling 2 threads / 1 thread (ops/s)",
        "",
        "For context on the thread targets: how each path scales on this machine.",
        "",
        "| Mechanism | " + " | ".join(MODULE_TITLES[m] for m in MODULES) + " |",
        "|---|" + "---:|" * len(MODULES),
    ]
    for mech in MECHS:
        cells = []
        for module in MODULES:
            one = summaries[Config(module, mech, 1)].median("ops_per_s")
            two = summaries[Config(module, mech, 2)].median("ops_per_s")
            cells.append("n/a" if one is None or two is None or one <= 0 else f"{two / one:.2f}x")
        lines.append(f"| {MECH_TITLES[mech]} | {' | '.join(cells)} |")
    lines += cold_section(cold, cold_runs, table)
    lines += counts_section(counts, table is not None)
    if scaled is not None:
        lines += scale.section(scaled)
    lines += [
        "",
        "## Targets",
        "",
        "| Target | Measured | Result |",
        "|---|---|---|",
    ]
    targets = [*evaluate_targets(summaries), *startup_targets(cold, counts, table is not None),
               *scale_targets(scaled)]
    lines += [f"| {t.description} | {t.measured} | {t.verdict} |" for t in targets]
    analysis = Path(__file__).with_name("analysis.md")
    if analysis.exists():
        lines += ["", *analysis.read_text().rstrip().splitlines()]
    failed = [s for s in summaries.values() if not s.complete]
    cold_failed = [s for s in cold.values() if not s.complete]
    counts_failed = [c for c in counts if not c.ok]
    scale_failed = scaled.failures if scaled is not None else []
    if failed or cold_failed or counts_failed or scale_failed:
        lines += [
            "",
            "## Failed runs",
            "",
            "These runs failed or reported PKCS#11 errors; the figures above are not",
            "trustworthy until they are fixed (`make bench` exits non-zero).",
            "",
        ]
        for summary in failed:
            for run in summary.runs:
                if not run.ok or run.errors:
                    why = run.detail or f"{run.errors} error(s)"
                    lines.append(f"- {summary.config.describe().strip()}: {why}")
        for cold_summary in cold_failed:
            for cold_run in cold_summary.runs:
                if not cold_run.ok or cold_run.errors:
                    why = cold_run.detail or f"{cold_run.errors} error(s)"
                    lines.append(f"- cold start, {cold_summary.module}: {why}")
        for count in counts_failed:
            lines.append(
                f"- counted run, {count.signatures} signatures, {count.threads} thread(s):"
                f" {count.detail}"
            )
        lines += [f"- {line}" for line in scale_failed]
    lines.append("")
    return "\n".join(lines)


# --- profile ------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    """$PY_SPY, else py-spy on PATH, else in .venv.

    $PY_SPY lets py-spy live in another virtualenv without putting that virtualenv's bin/
    first on PATH, which the module's embedded interpreter would pick up.
    """
    explicit = os.environ.get("PY_SPY")
    if explicit:
        return explicit if Path(explicit).exists() else None
    found = shutil.which("py-spy")
    if found:
        return found
    local = ROOT / ".venv" / "bin" / "py-spy"
    return str(local) if local.exists() else None


def wait_for_libpython(pid: int, timeout: float) -> bool:
    """Wait until the process has mapped libpython (our module embeds the interpreter)."""
    maps = Path(f"/proc/{pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libpython" in maps.read_text():
                return True
        except OSError:
            return False  # the process has gone
        time.sleep(0.05)
    return False


def grid_service_pid(box: Sandbox) -> int | None:
    pidfile = box.env.get("P11GRID_GRID_PIDFILE")
    if not pidfile:
        return None
    try:
        return int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def profile(box: Sandbox, module: str, seconds: float, warmup: float) -> int:
    """Run the ECDSA 1-thread case of `module` once under py-spy (and the grid service too).

    py-spy attaches by pid once the interpreter is loaded: `py-spy record -- p11bench ...`
    gives up at once because p11bench only loads Python when it dlopen()s the module.
    """
    py_spy = find_py_spy()
    if py_spy is None:
        log("py-spy is not installed; skipping the profile (pip install py-spy, or $PY_SPY)")
        return 0
    host_svg = BUILD_DIR / "profile-host.svg"
    grid_svg = BUILD_DIR / "profile-grid.svg"
    budget = seconds + warmup + 300
    cmd = bench_command(box, Config(module, "ec", 1), seconds, warmup)
    log(" ".join(cmd))
    bench = subprocess.Popen(
        cmd, env=child_env(box, module), stdout=subprocess.PIPE, text=True
    )
    spies: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        if not wait_for_libpython(bench.pid, timeout=60):
            log("no Python interpreter appeared in p11bench; nothing to profile")
            bench.wait(timeout=seconds + warmup + 120)
            return 1
        time.sleep(0.5)  # let C_Initialize start the interpreter
        targets = [("p11bench", bench.pid, host_svg)]
        if module == "grid":
            pid = grid_service_pid(box)
            if pid is None:
                log("no grid service pid in P11GRID_GRID_PIDFILE; profiling the host only")
            else:
                targets.append(("grid service", pid, grid_svg))
        for name, pid, output in targets:
            spy = [py_spy, "record", "--native", "-o", str(output), "--pid", str(pid)]
            if name == "grid service":
                spy += ["--duration", str(max(int(seconds), 1))]
            log(" ".join(spy))
            spies.append((name, subprocess.Popen(spy)))
        stdout, _ = bench.communicate(timeout=budget)
        rcs = {name: proc.wait(timeout=budget) for name, proc in spies}
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for name, proc in spies:
            stop_process(proc, f"py-spy on the {name}")
    if stdout.strip():
        log(f"p11bench: {stdout.strip()}")
    if any(rcs.values()) or bench.returncode != 0:
        log(f"py-spy exited with {rcs}, p11bench with {bench.returncode}")
        return 1
    log("profile written to " + ", ".join(str(out) for _, _, out in targets))
    return 0


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="timed seconds per run (default: 2; 5 with --profile)",
    )
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up seconds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    parser.add_argument(
        "--cold-runs", type=int, default=9, help="cold-start processes per module (default: 9)"
    )
    parser.add_argument(
        "--p11grid",
        type=Path,
        default=DEFAULT_P11GRID,
        help="the p11grid command providing `sandbox up/down` (default: .venv/bin/p11grid)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="report to write (default: docs/BENCHMARKS.md; build/bench/scale.md with"
        " --only scale)",
    )
    parser.add_argument(
        "--scale-repeats",
        type=int,
        default=scale.ScaleSettings.repeats,
        help=f"runs per configuration of the scale part (default: {scale.ScaleSettings.repeats})",
    )
    parser.add_argument(
        "--only",
        choices=("main", "scale"),
        default=None,
        help="run only the main part (modules, cold starts, counts) or only the scale part"
        " (elements, nodes, nginx handshakes); default: both",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only run the ECDSA 1-thread case of --profile-module once under py-spy"
        " (build/bench/profile-host.svg, and profile-grid.svg for the grid service);"
        " no benchmark, no report",
    )
    parser.add_argument(
        "--profile-module",
        choices=("local", "grid"),
        default="grid",
        help="which libp11grid configuration --profile runs (default: grid)",
    )
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 5.0 if args.profile else 2.0
    if args.output is None:
        args.output = BUILD_DIR / "scale.md" if args.only == "scale" else DOC
    if (args.repeats < 1 or args.cold_runs < 1 or args.scale_repeats < 1 or args.seconds <= 0
            or args.warmup < 0):
        parser.error("--repeats, --cold-runs and --scale-repeats must be >= 1, --seconds > 0,"
                     " --warmup >= 0")
    return args


def run_scale(box: Sandbox, args: argparse.Namespace) -> scale.ScaleResults:
    """The scale part (bench/scale.py) on the sandbox, with --scale-repeats, --seconds and
    --warmup; its p11bench processes get what a grid-path run gets."""
    settings = scale.ScaleSettings(repeats=args.scale_repeats, seconds=args.seconds,
                                   warmup=args.warmup)
    return scale.run(box.env, child_env(box, "grid"), BINARY, settings, log)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    scaled: scale.ScaleResults | None = None
    targets: list[Target] = []
    complete = True
    try:
        ensure_binary()
        with sandbox(args.p11grid) as sandbox_box:
            if args.profile:
                return profile(sandbox_box, args.profile_module, args.seconds, args.warmup)
            if args.only != "scale":
                with p11kit_server(sandbox_box) as box:
                    summaries = run_all(box, args.repeats, args.seconds, args.warmup)
                    cold = run_cold_all(box, args.cold_runs)
                    counts = run_counts(box)
                # Read while the sandbox is up: the report and the verdicts below need it.
                table = identity_table(box)
                targets += [*evaluate_targets(summaries),
                            *startup_targets(cold, counts, table is not None)]
                complete = (
                    all(summary.complete for summary in summaries.values())
                    and all(summary.complete for summary in cold.values())
                    and all(count.ok for count in counts)
                )
            if args.only != "main":
                scaled = run_scale(sandbox_box, args)
                targets += scale_targets(scaled)
                complete = complete and not scaled.failures
            if args.only == "scale":
                assert scaled is not None
                report = render_scale_only(scaled, started, load_before)
            else:
                report = render_report(
                    summaries,
                    cold,
                    counts,
                    table,
                    box,
                    args.repeats,
                    args.seconds,
                    args.warmup,
                    args.cold_runs,
                    started,
                    load_before,
                    scaled,
                )
    except (SetupError, scale.ScaleSetupError) as exc:
        log(f"setup failed: {exc}")
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    log(f"wrote {args.output}")
    for target in targets:
        log(f"{target.verdict:4}  {target.description}: {target.measured}")
    if not complete:
        log("some runs failed or reported errors")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
