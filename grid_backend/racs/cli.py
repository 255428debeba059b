"""`p11grid racs` (a person at a terminal, or a script) and `p11grid racs-serve`.

    p11grid racs --server HOST:PORT --cert C --key K --ca CA [SCRIPT]
        Sends request lines (BEGIN ..., commands, END) read from SCRIPT, or typed at a
        prompt, and prints each reply as it arrives. Typed lines go out one by one, so
        an error reply (sent by the server at once) shows before END is typed.

    p11grid racs-serve --config FILE
        Runs a RACS server; the TOML format is in grid_backend/racs/server.py and
        docs/racs.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import threading
import time
from pathlib import Path

from grid_backend.racs.client import RacsClient, RacsUnreachable, parse_address
from grid_backend.racs.protocol import ProtocolViolation


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    client = subparsers.add_parser("racs", help="talk RACS to a server, by hand or script")
    client.add_argument("--server", required=True, help="HOST:PORT of the RACS server")
    client.add_argument("--cert", required=True, type=Path, help="client certificate (PEM)")
    client.add_argument("--key", required=True, type=Path, help="its private key (PEM)")
    client.add_argument("--ca", required=True, type=Path, help="CA of the server (PEM)")
    client.add_argument("--server-name", help="name to check in the server certificate")
    client.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for each reply (default 30)")
    client.add_argument("script", nargs="?", type=Path,
                        help="file of request lines (default: the terminal)")
    client.set_defaults(func=run_client)

    serve = subparsers.add_parser("racs-serve", help="run a RACS server")
    serve.add_argument("--config", required=True, type=Path, help="TOML config file")
    serve.set_defaults(func=run_server)


def _client(args: argparse.Namespace) -> RacsClient:
    host, port = parse_address(args.server)
    return RacsClient(host, port, args.cert, args.key, args.ca, timeout=args.timeout,
                      server_name=args.server_name)


def run_client(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        client.connect()
    except RacsUnreachable as exc:
        print(f"p11grid racs: {exc}", file=sys.stderr)
        return 2
    try:
        if args.script is not None:
            return _run_script(client, args.script.read_text("ascii").splitlines())
        if not sys.stdin.isatty():
            return _run_script(client, sys.stdin.read().splitlines())
        return _run_terminal(client)
    finally:
        client.close()


def _run_script(client: RacsClient, lines: list[str]) -> int:
    """Send every line, then print one reply per request (each BEGIN yields one)."""
    client.send_lines(lines)
    expected = sum(1 for line in lines if line.split()[:1] == ["BEGIN"]) or 1
    deadline = time.monotonic() + client.timeout
    failed = False
    try:
        for _ in range(expected):
            reply = client.read_reply(deadline)
            sys.stdout.write(reply.format().replace("\r\n", "\n"))
            failed |= not reply.ok
    except RacsUnreachable as exc:
        print(f"p11grid racs: {exc}", file=sys.stderr)
        return 1
    except ProtocolViolation as exc:
        print(f"p11grid racs: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    return 1 if failed else 0


def _run_terminal(client: RacsClient) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()

    done = threading.Event()

    def print_replies() -> None:
        # Replies arrive when the server decides (at END, or at once on an error).
        while not done.is_set():
            try:
                lines = client.poll_lines(0.2)
            except (RacsUnreachable, ProtocolViolation, ValueError, OSError):
                if not done.is_set():
                    print("\n[session closed by the server]", flush=True)
                done.set()
                return
            for line in lines:
                print(line, flush=True)

    reader = threading.Thread(target=print_replies, daemon=True)
    reader.start()
    print("RACS: type BEGIN, commands, END; Ctrl-D quits.", file=sys.stderr)
    try:
        while not done.is_set():
            try:
                line = input("racs> ")
            except EOFError:
                break
            if done.is_set():
                break
            client.send_lines([line])
    except (RacsUnreachable, KeyboardInterrupt):
        pass
    time.sleep(0.2)  # let a reply in flight print
    done.set()
    return 0


def run_server(args: argparse.Namespace) -> int:
    from grid_backend.racs.server import RacsServer, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_config(args.config)
    except (OSError, ValueError, KeyError, ImportError, AttributeError) as exc:
        print(f"p11grid racs-serve: {args.config}: {exc}", file=sys.stderr)
        return 2

    async def serve() -> None:
        server = RacsServer(config)
        await server.start()
        print(f"RACS server listening on {config.host}:{server.port}", flush=True)
        try:
            await server.serve_forever()
        finally:
            await server.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
