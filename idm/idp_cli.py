"""`p11grid idp serve|record`: run the OpenID provider, and record VM-Auth-Tokens for it
to hand out (Option 1)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "/etc/p11grid/idp.toml"
log = logging.getLogger("p11grid.idp")


def _config_path(arguments: argparse.Namespace) -> Path:
    return Path(arguments.config or os.environ.get("P11GRID_IDP_CONFIG") or DEFAULT_CONFIG)


def _log_to(path: Path | None) -> None:
    handler: logging.Handler = (logging.FileHandler(path, encoding="utf-8") if path is not None
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s p11grid-idp[%(process)d] %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def serve(arguments: argparse.Namespace) -> int:
    from idm.idp import IdpConfigError, IdpServer, load_config

    try:
        config = load_config(_config_path(arguments))
    except IdpConfigError as exc:
        print(f"p11grid idp serve: {exc}", file=sys.stderr)
        return 2
    pid_file = Path(arguments.pid_file) if arguments.pid_file else config.pid_file
    try:
        _log_to(config.log_file)
        server = IdpServer(config)
        server.start()
        if config.metrics is not None:
            from idm.metrics import serve_metrics

            serve_metrics(server.provider.metrics, *config.metrics)
    except (IdpConfigError, OSError) as exc:
        print(f"p11grid idp serve: cannot start: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        if pid_file is not None:
            pid_file.write_text(f"{os.getpid()}\n")
        print(f"p11grid idp: serving {config.issuer} on {config.host}:{server.port}",
              flush=True)
        # A timed wait, so that a signal arriving between two waits is still seen soon.
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
    return 0


def record(arguments: argparse.Namespace) -> int:
    from idm.idp import IdpConfigError, load_config, record_token
    from idm.tokens import TokenRefused

    try:
        config = load_config(_config_path(arguments))
        token = Path(arguments.token).read_text(encoding="ascii")
        target, report = record_token(config, token)
    except (IdpConfigError, TokenRefused) as exc:
        print(f"p11grid idp record: {exc}", file=sys.stderr)
        return 1
    except (OSError, UnicodeDecodeError) as exc:
        print(f"p11grid idp record: cannot read {arguments.token}: {exc}", file=sys.stderr)
        return 1
    print(f"recorded the VM-Auth-Token of {report.subject} (issued by {report.issuer} for "
          f"{report.claims['aud']}, expires {report.expires:%Y-%m-%d %H:%M:%S} UTC) in {target}")
    return 0


def register(commands: Any) -> None:
    idp = commands.add_parser("idp", help="the OpenID provider: serve, record VM-Auth-Tokens")
    actions = idp.add_subparsers(dest="idp_action", required=True)
    config_help = f"the provider's TOML config (default $P11GRID_IDP_CONFIG, else {DEFAULT_CONFIG})"
    serving = actions.add_parser("serve", help="run the provider (HTTPS) until SIGTERM")
    serving.add_argument("--config", help=config_help)
    serving.add_argument("--pid-file", help="write the process id here (overrides pid_file)")
    serving.set_defaults(func=serve)
    recording = actions.add_parser(
        "record", help="verify a VM-Auth-Token and keep it for the provider to hand out")
    recording.add_argument("--config", help=config_help)
    recording.add_argument("--token", required=True, help="the VM-Auth-Token file")
    recording.set_defaults(func=record)
