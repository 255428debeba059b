"""Runs pcscd with vpcd and virtual PIV cards inside a network namespace of their own.

    unshare --net --mount python -m grid_backend.virtual_piv.launcher \
        --work WORK --card STATE_DIR:PORT [--card ...]

(`launch()` builds that command.) vpcd listens on all addresses, so it must never run in
the host's network namespace: the launcher refuses to start unless loopback is its only
interface. It bind-mounts WORK/run over /run (private to this mount namespace), so
pcscd's socket appears outside as WORK/run/pcscd/pcscd.comm (`client_socket()`), reachable
by clients through PCSCLITE_CSOCK_NAME: a unix socket in the filesystem crosses network
namespaces. libpcsclite reads that variable once per process. pcscd reads only
WORK/reader.conf.d. Card N plugs into vpcd on PORT; vpcd's first reader listens on 35963
("Virtual PCD 00 00"), the next one on 35964 ("Virtual PCD 00 01").

Writes WORK/pcscd.pid (a host pid: there is no pid namespace) and, once pcscd shows every
card present, WORK/ready. SIGTERM stops the cards, then pcscd, then the launcher.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so"
VPCD_PORT = 35963  # vpcd's first reader; the second one listens on the next port
PCSCD_SOCKET = "/run/pcscd/pcscd.comm"  # inside the namespace: WORK/run is /run there
READY_TIMEOUT = 15.0
TOOLS = ("unshare", "pcscd", "ip", "mount")


class LauncherFailed(RuntimeError):
    """The launcher could not start pcscd and its cards; the message holds its log."""


def client_socket(work: Path) -> Path:
    """pcscd's socket as seen from outside the namespace (the PCSCLITE_CSOCK_NAME value)."""
    return work / "run" / "pcscd" / "pcscd.comm"


def missing_requirements() -> list[str]:
    """What this host lacks to run the launcher (tools, the vpcd driver, root)."""
    import shutil

    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not os.path.exists(VPCD_DRIVER):
        missing.append(f"{VPCD_DRIVER} (vsmartcard-vpcd)")
    if os.geteuid() != 0:
        missing.append("root (unshare --net --mount)")
    return missing


def _pcscd_polkit_options() -> list[str]:
    """pcsc-lite 2.x as Debian 13 builds it asks polkit (over the system D-Bus, whose socket
    is under the /run we hide) whether a client may connect, and refuses it when polkit
    cannot answer. 1.9.9 (Debian 12) has no polkit and no --disable-polkit option."""
    usage = subprocess.run(["pcscd", "--help"], capture_output=True, text=True).stdout
    return ["--disable-polkit"] if "--disable-polkit" in usage else []


def launch(work: Path, cards: list[tuple[Path, int]], output: Path) -> subprocess.Popen[bytes]:
    """Start the launcher in fresh network and mount namespaces, in a session of its own
    (stop it with `stop`); its output goes to `output`."""
    command = ["unshare", "--net", "--mount", sys.executable, "-m",
               "grid_backend.virtual_piv.launcher", "--work", str(work)]
    for state, port in cards:
        command += ["--card", f"{state}:{port}"]
    with open(output, "ab") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)


def stop(process: subprocess.Popen[bytes], deadline: float = 10.0) -> None:
    """SIGTERM the launcher's process group (it stops its cards and pcscd), SIGKILL after
    `deadline` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until_ready(process: subprocess.Popen[bytes], work: Path, output: Path,
                     timeout: float = READY_TIMEOUT + 5.0) -> None:
    """Return once WORK/ready exists; LauncherFailed if the launcher ends or times out."""
    deadline = time.monotonic() + timeout
    while not (work / "ready").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            logs = [output, work / "pcscd.log", *sorted(work.glob("card*.log"))]
            text = "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                           for p in logs if p.exists())
            state = f"exit status {process.returncode}" if process.returncode is not None \
                else f"not ready within {timeout:.0f} s"
            raise LauncherFailed(f"the virtual PIV launcher failed ({state}):\n{text}")
        time.sleep(0.05)


def _cards_present(wanted: int) -> bool:
    from smartcard import scard

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        return False  # pcscd not up yet
    try:
        hresult, readers = scard.SCardListReaders(context, [])
        if hresult != scard.SCARD_S_SUCCESS or not readers:
            return False
        hresult, states = scard.SCardGetStatusChange(
            context, 0, [(reader, scard.SCARD_STATE_UNAWARE) for reader in readers])
        if hresult != scard.SCARD_S_SUCCESS:
            return False
        present = [r for r, state, _ in states if state & scard.SCARD_STATE_PRESENT
                   and not state & scard.SCARD_STATE_MUTE]
        return len(present) >= wanted
    finally:
        scard.SCardReleaseContext(context)


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:  # cards first: pcscd's readers stay sane to the end
        if child.poll() is None:
            child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m grid_backend.virtual_piv.launcher")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--card", action="append", default=[], help="STATE_DIR:PORT")
    args = parser.parse_args()
    # if_nameindex asks the kernel about this namespace (/sys/class/net shows the host's).
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces != ["lo"]:
        print(f"launcher: not in a fresh network namespace ({interfaces})", file=sys.stderr)
        return 2
    work: Path = args.work.resolve()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    run = work / "run"
    run.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(run), "/run"], check=True)
    # Our own PC/SC client (the readiness check) and pcscd agree on the socket whatever
    # the caller's environment says.
    os.environ["PCSCLITE_CSOCK_NAME"] = PCSCD_SOCKET
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
        pcscd = subprocess.Popen(["pcscd", "--foreground", "--error", "-c", str(conf),
                                  *_pcscd_polkit_options()],
                                 stdout=pcscd_log, stderr=subprocess.STDOUT)
    (work / "pcscd.pid").write_text(str(pcscd.pid))
    for index, card in enumerate(args.card):
        state, _, port = card.rpartition(":")
        with open(work / f"card{index}.log", "wb") as card_log:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "grid_backend.virtual_piv", "--state", state,
                 "--vpcd", f"127.0.0.1:{port}"], stdout=card_log, stderr=subprocess.STDOUT))
    status = 0
    deadline = time.monotonic() + READY_TIMEOUT
    # Ready means usable: pcscd has every card in a reader (vpcd connects asynchronously).
    while not stop.is_set() and not _cards_present(len(args.card)):
        if time.monotonic() > deadline or any(c.poll() is not None for c in (pcscd, *children)):
            print(f"launcher: the cards did not appear in pcscd within {READY_TIMEOUT:.0f} s",
                  file=sys.stderr)
            stop.set()
            status = 3
            break
        time.sleep(0.05)
    if status == 0:
        (work / "ready").write_text("ready\n")
    while not stop.wait(0.2):
        if any(child.poll() is not None for child in (pcscd, *children)):
            print("launcher: a child ended early", file=sys.stderr)
            status = 1
            break
    _stop([*children, pcscd])
    return status


if __name__ == "__main__":
    sys.exit(main())
