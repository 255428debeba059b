"""The `p11grid` command: one entry for every room's operator tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from grid_backend.racs import cli as racs_cli
from grid_backend.service import cli as grid_cli
from idm import cli as idm_cli
from idm import idp_cli
from p11grid import paths, sandbox


def _say(line: str) -> None:
    print(line, flush=True)


def _sandbox(arguments: argparse.Namespace) -> int:
    try:
        if arguments.action == "up":
            sandbox.up(arguments.directory, say=_say)
        else:
            sandbox.down(arguments.directory, say=_say, deadline=arguments.deadline)
    except (sandbox.SandboxError, paths.MissingDependencyError) as error:
        print(f"p11grid sandbox {arguments.action}: error: {error}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p11grid", description="Operator tools of the p11grid PKCS#11 module."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sandbox_parser = commands.add_parser(
        "sandbox", help="a ready-to-use world (secure elements, grid, CA, configs) in a directory"
    )
    actions = sandbox_parser.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="build a sandbox in DIR (new or empty)")
    up.add_argument("directory", metavar="DIR", type=Path)
    down = actions.add_parser("down", help="stop the sandbox's processes and remove DIR")
    down.add_argument("directory", metavar="DIR", type=Path)
    down.add_argument(
        "--deadline",
        type=float,
        default=sandbox.STOP_DEADLINE_SECONDS,
        metavar="SECONDS",
        help="how long a process may take to end after SIGTERM before SIGKILL",
    )
    sandbox_parser.set_defaults(func=_sandbox)
    grid_cli.register(commands)
    idm_cli.register(commands)
    idm_cli.register_tokens(commands)
    idp_cli.register(commands)
    racs_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    return int(arguments.func(arguments))


if __name__ == "__main__":
    sys.exit(main())
