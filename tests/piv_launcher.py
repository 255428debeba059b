"""Runs pcscd with vpcd and virtual PIV cards inside a network namespace of their own.

Started by tests/test_piv.py as `unshare --net --mount python tests/piv_launcher.py ...`.
vpcd listens on all addresses, so it must never run in the host's network namespace: the
launcher refuses to start unless loopback is its only interface. It bind-mounts WORK/run
over /run (private to this mount namespace), so pcscd's socket appears outside as
WORK/run/pcscd/pcscd.comm, reachable by clients through PCSCLITE_CSOCK_NAME (a unix socket
in the filesystem crosses network namespaces). pcscd reads only WORK/reader.conf.d.

Writes WORK/pcscd.pid (a host pid: there is no pid namespace) and WORK/ready when all is
started. SIGTERM stops the cards, then pcscd, then the launcher.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
VPCD_PORT = 35963  # vpcd's first reader; the second one listens on the next port


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--card", action="append", default=[], help="STATE_DIR:PORT")
    args = parser.parse_args()
    # if_nameindex asks the kernel about this namespace (/sys/class/net shows the host's).
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces != ["lo"]:
        print(f"launcher: not in a fresh network namespace ({interfaces})", file=sys.stderr)
        return 2
    work: Path = args.work
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    run = work / "run"
    run.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(run), "/run"], check=True)
    conf = work / "reader.conf.d"
    conf.mkdir(exist_ok=True)
    (conf / "vpcd").write_text(
        f'FRIENDLYNAME "Virtual PCD"\nDEVICENAME /dev/null:0x{VPCD_PORT:X}\n'
        f"LIBPATH {VPCD_DRIVER}\nCHANNELID 0x{VPCD_PORT:X}\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    children: list[subprocess.Popen[bytes]] = []
    with open(work / "pcscd.log", "wb") as pcscd_log:
        pcscd = subprocess.Popen(["pcscd", "--foreground", "--error", "-c", str(conf)],
                                 stdout=pcscd_log, stderr=subprocess.STDOUT)
    (work / "pcscd.pid").write_text(str(pcscd.pid))
    for index, card in enumerate(args.card):
        state, _, port = card.rpartition(":")
        with open(work / f"card{index}.log", "wb") as card_log:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "grid_backend.virtual_piv", "--state", state,
                 "--vpcd", f"127.0.0.1:{port}"], stdout=card_log, stderr=subprocess.STDOUT))
    (work / "ready").write_text("ready\n")
    while not stop.wait(0.2):
        if any(child.poll() is not None for child in (pcscd, *children)):
            print("launcher: a child ended early", file=sys.stderr)
            break
    for child in (*children, pcscd):  # cards first: pcscd's readers stay sane to the end
        if child.poll() is None:
            child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
