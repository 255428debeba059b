"""Command line of the virtual PIV card.

    python -m grid_backend.virtual_piv init --state DIR --pin 123456 \
        --keys 9a:rsa2048,9c:ec256 --subject CN=name [--ca-cert F --ca-key F] \
        [--days 30] [--dns NAME]... [--ip ADDRESS]... [--retries 3]
    python -m grid_backend.virtual_piv [run] --state DIR [--vpcd 127.0.0.1:35963]

`init` creates a card (refusing a DIR that already holds one) and prints, per slot, the
certificate's subject and SHA-256 fingerprint. `run` plugs the card into vpcd, reconnects
with backoff when vpcd goes away, and exits cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from cryptography.hazmat.primitives import hashes

from grid_backend.virtual_piv import vpicc
from grid_backend.virtual_piv.applet import PivApplet
from grid_backend.virtual_piv.issue import IssueFailure, initialize_card, parse_key_requests
from grid_backend.virtual_piv.state import CardState

DEFAULT_VPCD = "127.0.0.1:35963"


def _init(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m grid_backend.virtual_piv init")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--pin", required=True, help="6 to 8 digits")
    parser.add_argument("--keys", required=True, help="e.g. 9a:rsa2048,9c:ec256")
    parser.add_argument("--subject", required=True, help="RFC 4514, e.g. CN=piv-rsa")
    parser.add_argument("--ca-cert", type=Path)
    parser.add_argument("--ca-key", type=Path)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--dns", action="append", default=[])
    parser.add_argument("--ip", action="append", default=[])
    parser.add_argument("--retries", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        certificates = initialize_card(
            args.state, args.pin, parse_key_requests(args.keys), args.subject,
            args.ca_cert, args.ca_key, args.days, args.dns, args.ip, args.retries)
    except (ValueError, OSError, IssueFailure) as exc:
        print(f"init: {exc}", file=sys.stderr)
        return 2
    for slot, certificate in certificates.items():
        fingerprint = certificate.fingerprint(hashes.SHA256()).hex()
        print(f"slot {slot:02x}: {certificate.subject.rfc4514_string()} sha256:{fingerprint}")
    return 0


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m grid_backend.virtual_piv")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--vpcd", default=DEFAULT_VPCD, help="host:port of vpcd")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="virtual-piv: %(message)s")
    host, _, port_text = args.vpcd.rpartition(":")
    if not host or not port_text.isdigit():
        parser.error("--vpcd wants host:port")
    if not CardState.exists(args.state):
        print(f"virtual-piv: no card in {args.state} (run init first)", file=sys.stderr)
        return 2
    card = PivApplet(CardState.load(args.state))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    vpicc.run(card, host, int(port_text), stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["init"]:
        return _init(arguments[1:])
    if arguments[:1] == ["run"]:
        arguments = arguments[1:]
    return _run(arguments)


if __name__ == "__main__":
    sys.exit(main())
