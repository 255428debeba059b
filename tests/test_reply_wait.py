"""How the module waits for a grid reply: native/p11grid.c polls the socket without the
GIL for up to `spin_us` (so a reply does not have to wake a sleeping thread on another
CPU), and the pool decides when that poll is worth its CPU (grid_backend/client/pool.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from grid_backend.client import GridPool, GridSettings
from grid_backend.client.pool import _Contention

# Runs in a Python host that loaded libp11grid.so through python-pkcs11: cffi's embedding
# then leaves the module's own `lib` in sys.modules, with the native wait on it.
_NATIVE_PROBE = r"""
import json, os, socket, threading, time
import pkcs11
pkcs11.lib(os.environ["P11GRID_MODULE"])
from _p11grid_embed import lib

wait = lib.p11grid_native_await_readable
quiet, other = socket.socketpair()
results = {}

started = time.monotonic()
results["quiet"] = [wait(quiet.fileno(), 20_000), time.monotonic() - started]

other.send(b"!")
started = time.monotonic()
results["readable"] = [wait(quiet.fileno(), 2_000_000), time.monotonic() - started]
quiet.recv(1)

results["closed"] = wait(999_999, 20_000)  # no such descriptor (a closed one's number may be
                                           # taken again by the library's own threads)
results["zero"] = wait(quiet.fileno(), 0)

# While one thread waits 0.3 s in C, another must run Python: the GIL is not held.
counted = [0]
stop = threading.Event()
def count():
    while not stop.is_set():
        counted[0] += 1
counter = threading.Thread(target=count)
counter.start()
time.sleep(0.02)
before = counted[0]
results["waited"] = wait(quiet.fileno(), 300_000)
results["counted_meanwhile"] = counted[0] - before
stop.set()
counter.join()
print(json.dumps(results))
"""


def test_native_wait_polls_without_the_gil(sandbox: dict[str, str],
                                           sandbox_environ: dict[str, str]) -> None:
    environ = {**sandbox_environ, "P11GRID_CONF": sandbox["P11GRID_LOCAL_CONF"]}
    done = subprocess.run([sys.executable, "-c", _NATIVE_PROBE], env=environ,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    verdict, took = results["quiet"]
    assert verdict == 0 and 0.019 <= took < 1.0  # nothing came: the whole time, bounded
    verdict, took = results["readable"]
    assert verdict == 1 and took < 0.5  # at once, not after its 2 s
    assert results["closed"] == -1  # not an open descriptor
    assert results["zero"] == 0  # no time: no poll
    assert results["waited"] == 0
    # A thread holding the GIL for the 0.3 s would leave the counter near zero.
    assert results["counted_meanwhile"] > 10_000, results


def _pool(sandbox: dict[str, str], spin: float,
          calls: list[tuple[int, int]]) -> GridPool:
    grid = Path(sandbox["P11GRID_SANDBOX"]) / "grid"
    host, port = sandbox["P11GRID_GRID_ADDR"].rsplit(":", 1)

    def recording_wait(fd: int, spin_us: int) -> int:
        calls.append((fd, spin_us))
        return 0  # as if nothing came in time: the pool's own read must still get it

    pool = GridPool(GridSettings(endpoints=((host, int(port)),), ca=Path(sandbox["P11GRID_CA"]),
                                 certificate=grid / "vm.pem", key=grid / "vm.key",
                                 timeout=5.0, spin=spin), recording_wait)
    pool._contention.busy = lambda polling=0: False  # type: ignore[method-assign]
    return pool


def test_pool_polls_for_quick_replies_only(sandbox: dict[str, str]) -> None:
    calls: list[tuple[int, int]] = []
    pool = _pool(sandbox, 0.005, calls)
    try:
        for _ in range(10):
            assert pool.call("hello", {}, idempotent=True)["identity"]
        # A reply of the real grid takes well under 5 ms: the requests poll, for the
        # configured time, on the connection's own socket (a reply slower than 5 ms on a
        # loaded test machine may stop one or two of them).
        polled = [us for _, us in calls]
        assert set(polled) == {5000} and len(polled) >= 8, polled
        assert all(fd >= 0 for fd, _ in calls)
    finally:
        pool.close()

    calls.clear()
    pool = _pool(sandbox, 0.000001, calls)  # a 1 us poll: every reply takes longer
    try:
        for _ in range(5):
            assert pool.call("hello", {}, idempotent=True)["identity"]
        # The first reply of a new connection is not counted (it waits for the
        # connection's set-up); after the second, the pool knows replies come later.
        assert len(calls) == 2
    finally:
        pool.close()


def test_pool_without_a_native_wait_never_polls(sandbox: dict[str, str]) -> None:
    grid = Path(sandbox["P11GRID_SANDBOX"]) / "grid"
    host, port = sandbox["P11GRID_GRID_ADDR"].rsplit(":", 1)
    pool = GridPool(GridSettings(endpoints=((host, int(port)),), ca=Path(sandbox["P11GRID_CA"]),
                                 certificate=grid / "vm.pem", key=grid / "vm.key"))
    try:
        assert pool._spin_us(("hello", None, None)) == 0
        assert pool.call("hello", {}, idempotent=True)["identity"]
    finally:
        pool.close()


def test_busy_machine_counts_the_process_own_pollers_out(tmp_path: Path) -> None:
    loadavg = tmp_path / "loadavg"
    contention = _Contention()
    contention._cpus = 2
    contention.LOADAVG = loadavg  # type: ignore[misc]

    def runnable(count: int, polling: int) -> bool:
        loadavg.write_text(f"0.50 0.40 0.30 {count}/321 4242\n")
        contention._checked = 0.0  # read again now
        return contention.busy(polling=polling)

    assert runnable(2, 0) is False  # the reader and one other: room for both
    assert runnable(3, 0) is True  # a third runnable thread: no polling
    assert runnable(3, 1) is False  # ...unless it is our own poller, which gives way
    assert runnable(4, 1) is True
    loadavg.write_text("unreadable")
    contention._checked = 0.0
    assert contention.busy() is False  # unknown load: poll, as before
