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
  5. stop the p11-kit server, bring the sandbox down and write docs/BENCHMARKS.md with the
     figures, the ratios, the latency each path adds to the direct token, and PASS/MISS
     per target.

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
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

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


def run_one(box: Sandbox, config: Config, seconds: float, warmup: float) -> RunResult:
    cmd = bench_command(box, config, seconds, warmup)
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            env=child_env(box, config.module),
            timeout=seconds + warmup + 60,
        )
    except subprocess.TimeoutExpired:
        return RunResult(config, ok=False, detail="timed out")
    stderr = proc.stderr.strip()
    if proc.returncode != 0:
        last = stderr.splitlines()[-1] if stderr else "no message"
        return RunResult(config, ok=False, detail=f"exit {proc.returncode}: {last}")
    for line in stderr.splitlines():
        log(f"  | {line}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return RunResult(config, ok=False, detail="no JSON result line")
    try:
        data = json.loads(lines[-1])
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
        return RunResult(config, ok=False, detail=f"bad JSON result: {exc}: {lines[-1]}")


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


def render_report(
    summaries: Mapping[Config, Summary],
    box: Sandbox,
    repeats: int,
    seconds: float,
    warmup: float,
    started: dt.datetime,
    load_before: str,
) -> str:
    info = machine_info()
    lines: list[str] = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`.venv/bin/python bench/run.py`); do not edit by hand,",
        "re-run the command instead.",
        "",
        "## What is measured",
        "",
        "Signing throughput and latency of four ways to reach the same SoftHSM2 token of a",
        "fresh `p11grid sandbox` (keys `vm-rsa`, RSA-2048, and `vm-ec`, EC P-256):",
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
        "   signs with SoftHSM2 in its own process. While a request is the host's only",
        "   one in flight, the client polls for its reply for up to `spin_us` (1000 µs)",
        "   before sleeping (`docs/grid-protocol.md`).",
        "",
        "- Host: `bench/p11bench.c`, a C program that `dlopen`s one module per process",
        "  (two modules never share a process), calls `C_Initialize` with",
        "  `CKF_OS_LOCKING_OK`, opens one `CKF_SERIAL_SESSION` per thread, logs in as user",
        "  and finds the private key by `CKA_LABEL`. Every run uses the system OpenSSL",
        "  configuration (the sandbox's `OPENSSL_CONF`, which loads an engine on",
        "  libp11grid, is passed neither to the host nor to the p11-kit server).",
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
        "",
        "**Quote the ratios, not the absolute figures**: absolute ops/s and latencies",
        "depend on the machine and its load; the ratios are what the targets are about.",
        "",
        "Options: `bench/run.py --seconds S --repeats N` for longer or more runs;",
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
    lines += [
        "",
        "## Targets",
        "",
        "| Target | Measured | Result |",
        "|---|---|---|",
    ]
    lines += [
        f"| {t.description} | {t.measured} | {t.verdict} |" for t in evaluate_targets(summaries)
    ]
    analysis = Path(__file__).with_name("analysis.md")
    if analysis.exists():
        lines += ["", *analysis.read_text().rstrip().splitlines()]
    failed = [s for s in summaries.values() if not s.complete]
    if failed:
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
        "--p11grid",
        type=Path,
        default=DEFAULT_P11GRID,
        help="the p11grid command providing `sandbox up/down` (default: .venv/bin/p11grid)",
    )
    parser.add_argument(
        "--output", type=Path, default=DOC, help="report to write (default: docs/BENCHMARKS.md)"
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
    if args.repeats < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--repeats must be >= 1, --seconds > 0, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = load_average()
    try:
        ensure_binary()
        with sandbox(args.p11grid) as sandbox_box:
            if args.profile:
                return profile(sandbox_box, args.profile_module, args.seconds, args.warmup)
            with p11kit_server(sandbox_box) as box:
                summaries = run_all(box, args.repeats, args.seconds, args.warmup)
            report = render_report(
                summaries, box, args.repeats, args.seconds, args.warmup, started, load_before
            )
    except SetupError as exc:
        log(f"setup failed: {exc}")
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    log(f"wrote {args.output}")
    for target in evaluate_targets(summaries):
        log(f"{target.verdict:4}  {target.description}: {target.measured}")
    if not all(summary.complete for summary in summaries.values()):
        log("some runs failed or reported errors")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
