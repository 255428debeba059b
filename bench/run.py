"""`make bench`: libp11grid against SoftHSM2 used directly, signing with RSA-2048 and P-256.

Steps:
  1. compile bench/p11bench.c into build/bench/p11bench when it is missing or stale;
  2. bring up a fresh sandbox (`p11grid sandbox up DIR`, DIR in a temp directory) and read
     DIR/env for the module paths, token labels and PIN;
  3. run p11bench, one process per run (never two modules in one process), for
     {direct SoftHSM, libp11grid} x {rsa, ec} x {1, 2 threads}, interleaving direct and
     libp11grid runs and repeating every configuration, then take the median per configuration;
  4. bring the sandbox down and write docs/BENCHMARKS.md with the figures, the ratios
     libp11grid/direct and PASS/MISS per target.

Exit status: 0 when every run succeeded without errors (missed targets are reported, not
fatal); 1 when any run failed or reported errors; 2 when setup (compile, sandbox) failed.

`--profile` instead runs the libp11grid EC 1-thread case once under py-spy (when installed)
and writes build/bench/profile.svg; it does not run the benchmark or touch the docs.
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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
)
MECHS = ("rsa", "ec")
THREADS = (1, 2)
MODULES = ("direct", "p11grid")
KEY_LABELS = {"rsa": "vm-rsa", "ec": "vm-ec"}
MECH_TITLES = {"rsa": "RSA-2048 CKM_RSA_PKCS", "ec": "ECDSA P-256 CKM_ECDSA"}
MODULE_TITLES = {"direct": "SoftHSM2 direct", "p11grid": "libp11grid"}
# Minimum libp11grid/direct ops/s ratio at 1 thread, per mechanism (from the issue).
RATIO_TARGETS = {"rsa": 0.9, "ec": 0.6}


class SetupError(Exception):
    """The benchmark could not be set up (compiler, sandbox, environment file)."""


@dataclass(frozen=True)
class Sandbox:
    """What the benchmark needs from DIR/env."""

    env: dict[str, str]

    def module_path(self, module: str) -> str:
        return self.env["P11GRID_MODULE" if module == "p11grid" else "P11GRID_DIRECT_MODULE"]

    def token(self, module: str) -> str:
        return self.env["P11GRID_TOKEN" if module == "p11grid" else "P11GRID_DIRECT_TOKEN"]

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


def child_env(box: Sandbox) -> dict[str, str]:
    """The environment of p11bench: ours, minus stale sandbox settings, plus the sandbox's."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in DROPPED_ENV and not name.startswith(("P11GRID_", "SOFTHSM2_"))
    }
    env.update(
        (name, value)
        for name, value in box.env.items()
        if name not in DROPPED_ENV and not name.endswith("OPENSSL_CONF")
    )
    return env


def run_one(box: Sandbox, config: Config, seconds: float, warmup: float) -> RunResult:
    cmd = bench_command(box, config, seconds, warmup)
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            env=child_env(box),
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
    """Each configuration `repeats` times; direct/libp11grid back to back, order alternating."""
    order: list[Config] = []
    for rep in range(repeats):
        modules = MODULES if rep % 2 == 0 else tuple(reversed(MODULES))
        for mech in MECHS:
            for threads in THREADS:
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


def ratio(summaries: Mapping[Config, Summary], mech: str, threads: int) -> float | None:
    ours = summaries[Config("p11grid", mech, threads)].median("ops_per_s")
    direct = summaries[Config("direct", mech, threads)].median("ops_per_s")
    if ours is None or direct is None or direct <= 0:
        return None
    return ours / direct


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
    for mech, minimum in RATIO_TARGETS.items():
        value = ratio(summaries, mech, 1)
        targets.append(
            Target(
                f"{MECH_TITLES[mech]}, 1 thread: libp11grid >= {minimum:g}x direct ops/s",
                "n/a" if value is None else f"{value:.2f}x",
                None if value is None else value >= minimum,
            )
        )
    for mech in MECHS:
        one = summaries[Config("p11grid", mech, 1)].median("ops_per_s")
        two = summaries[Config("p11grid", mech, 2)].median("ops_per_s")
        measured = "n/a" if one is None or two is None else f"{two:,.1f} vs {one:,.1f} ops/s"
        targets.append(
            Target(
                f"{MECH_TITLES[mech]}: libp11grid at 2 threads >= libp11grid at 1 thread",
                measured,
                None if one is None or two is None else two >= one,
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
        "Signing throughput and latency of **libp11grid** (`build/libp11grid.so`) against",
        "the **SoftHSM2 module used directly** (`libsofthsm2.so`), over the same keys of a",
        "fresh `p11grid sandbox`: `vm-rsa` (RSA-2048) and `vm-ec` (EC P-256).",
        "",
        "- Host: `bench/p11bench.c`, a C program that `dlopen`s one module per process",
        "  (two modules never share a process), calls `C_Initialize` with",
        "  `CKF_OS_LOCKING_OK`, opens one `CKF_SERIAL_SESSION` per thread, logs in as user",
        "  and finds the private key by `CKA_LABEL`. Both modules run with the sandbox's",
        "  `SOFTHSM2_CONF`/`P11GRID_CONF` and the system OpenSSL configuration (the",
        "  sandbox's `OPENSSL_CONF`, which loads an engine on libp11grid, is not passed on).",
        "- One operation is `C_SignInit` + `C_Sign` into a buffer sized once up front:",
        "  `CKM_RSA_PKCS` over a fixed 51-byte SHA-256 DigestInfo, or `CKM_ECDSA` over a",
        "  fixed 32-byte hash.",
        f"- Each run: {warmup:g} s warm-up, then {seconds:g} s timed; ops/s counts the",
        "  successful timed operations over the timed window; p50/p99 are the latencies of",
        "  single operations across all threads.",
        f"- Every configuration (module x mechanism x threads) is run {repeats} times,",
        "  direct and libp11grid runs interleaved back to back (alternating which goes",
        "  first), and the **median** of the repeats is reported, so that machine noise",
        "  affects both columns alike.",
        "",
        "**Quote the ratios libp11grid/direct, not the absolute figures**: absolute ops/s",
        "and latencies depend on the machine and its load; the ratios are what the targets",
        "are about.",
        "",
        "Options: `bench/run.py --seconds S --repeats N` for longer or more runs;",
        "`bench/run.py --profile` runs the libp11grid ECDSA 1-thread case once under",
        "`py-spy` (if installed) and writes `build/bench/profile.svg` instead.",
        "",
        "## Machine",
        "",
        f"- Run: {started.strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    lines += [f"- {name}: {value}" for name, value in info.items()]
    lines += [f"- Load average (1/5/15 min) before the run: {load_before}"]
    lines += [
        f"- Modules: libp11grid `{box.module_path('p11grid')}`;"
        f" direct `{box.module_path('direct')}`",
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
        "## Ratios libp11grid / direct (ops/s)",
        "",
        "| Mechanism | 1 thread | 2 threads |",
        "|---|---:|---:|",
    ]
    for mech in MECHS:
        cells = []
        for threads in THREADS:
            value = ratio(summaries, mech, threads)
            cells.append("n/a" if value is None else f"{value:.2f}x")
        lines.append(f"| {MECH_TITLES[mech]} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Scaling 2 threads / 1 thread (ops/s)",
        "",
        "For context on the thread target: how each module scales on this machine.",
        "",
        "| Mechanism | SoftHSM2 direct | libp11grid |",
        "|---|---:|---:|",
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


def profile(box: Sandbox, seconds: float, warmup: float) -> int:
    """Run the libp11grid EC 1-thread case once under py-spy.

    py-spy attaches by pid once the interpreter is loaded: `py-spy record -- p11bench ...`
    gives up at once because p11bench only loads Python when it dlopen()s the module.
    """
    py_spy = find_py_spy()
    if py_spy is None:
        log("py-spy is not installed; skipping the profile (pip install py-spy)")
        return 0
    output = BUILD_DIR / "profile.svg"
    cmd = bench_command(box, Config("p11grid", "ec", 1), seconds, warmup)
    log(" ".join(cmd))
    bench = subprocess.Popen(cmd, env=child_env(box), stdout=subprocess.PIPE, text=True)
    try:
        if not wait_for_libpython(bench.pid, timeout=60):
            log("no Python interpreter appeared in p11bench; nothing to profile")
            bench.wait(timeout=seconds + warmup + 120)
            return 1
        time.sleep(0.5)  # let C_Initialize start the interpreter
        spy = [py_spy, "record", "--native", "-o", str(output), "--pid", str(bench.pid)]
        log(" ".join(spy))
        spy_rc = subprocess.run(spy, check=False, timeout=seconds + warmup + 300).returncode
        stdout, _ = bench.communicate(timeout=seconds + warmup + 120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    if stdout.strip():
        log(f"p11bench: {stdout.strip()}")
    if spy_rc != 0 or bench.returncode != 0:
        log(f"py-spy exited with {spy_rc}, p11bench with {bench.returncode}")
        return 1
    log(f"profile written to {output}")
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
        help="only run the libp11grid EC 1-thread case once under py-spy"
        " (build/bench/profile.svg); no benchmark, no report",
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
        with sandbox(args.p11grid) as box:
            if args.profile:
                return profile(box, args.seconds, args.warmup)
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
