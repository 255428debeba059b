"""The `p11grid` command: one entry for every room's operator tools."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from grid_backend.racs import cli as racs_cli
from grid_backend.registry import cli as registry_cli
from grid_backend.service import cli as grid_cli
from idm import cli as idm_cli
from idm import idp_cli
from p11grid import paths, sandbox, snippets


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


def _config(arguments: argparse.Namespace) -> int:
    """`p11grid config openssl [--provider]|provider-key|nginx|p11kit|systemd-*`: print
    (or install) a ready snippet."""
    module = Path(arguments.module or paths.MODULE_PATH).resolve()
    if (arguments.provider or arguments.pin_file) and arguments.what != "openssl":
        print(f"p11grid config {arguments.what}: --provider and --pin-file are for "
              "`p11grid config openssl`", file=sys.stderr)
        return 2
    if arguments.what == "openssl" and arguments.provider:
        if arguments.pin is not None and arguments.pin_file is not None:
            print("p11grid config openssl: give --pin or --pin-file, not both", file=sys.stderr)
            return 2
        provider = snippets.find_pkcs11_provider()
        if provider is None:
            print(f"p11grid config openssl --provider: {snippets.pkcs11_provider_missing_reason()}",
                  file=sys.stderr)
            return 1
        text = snippets.openssl_provider_conf(
            provider, module, arguments.pin,
            Path(arguments.pin_file).resolve() if arguments.pin_file else None,
            "OpenSSL 3: pkcs11-provider on the p11grid module (p11grid config openssl "
            "--provider); point OPENSSL_CONF at this file")
    elif arguments.what == "openssl":
        if arguments.pin_file:
            print("p11grid config openssl: --pin-file needs --provider (the engine takes "
                  "--pin)", file=sys.stderr)
            return 2
        text = snippets.openssl_engine_conf(
            Path(arguments.engine) if arguments.engine else paths.pkcs11_engine(), module,
            arguments.pin, "OpenSSL: the libp11 engine on the p11grid module (p11grid config "
            "openssl); point OPENSSL_CONF at this file")
    elif arguments.what == "provider-key":
        if not arguments.key_uri:
            print("p11grid config provider-key: give --key-uri", file=sys.stderr)
            return 2
        try:
            text = snippets.provider_key_pem(arguments.key_uri)
        except snippets.ProviderKeyError as error:
            print(f"p11grid config provider-key: {error}", file=sys.stderr)
            return 2
    elif arguments.what == "nginx":
        if not arguments.key_uri or not arguments.certificate:
            print("p11grid config nginx: give --key-uri and --certificate", file=sys.stderr)
            return 2
        text = ("# main context (nginx.conf, outside http {}): the workers need these\n"
                + snippets.nginx_main_lines()
                + "\n# inside http { }:\n"
                + snippets.nginx_server(arguments.listen, Path(arguments.certificate).resolve(),
                                        arguments.key_uri, arguments.server_name))
    elif arguments.what in ("systemd-grid", "systemd-idp"):
        p11grid = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "p11grid" \
            else Path(sys.executable).parent / "p11grid"
        text = snippets.systemd_unit(arguments.what.split("-", 1)[1], p11grid,
                                     Path(arguments.service_config).resolve()
                                     if arguments.service_config else None)
    else:
        text = snippets.p11kit_module(module)
    if arguments.install:
        target = Path(arguments.install)
        if target.is_dir() or not target.suffix:  # a directory, made if need be
            target.mkdir(parents=True, exist_ok=True)
            target = target / {"p11kit": "p11grid.module", "openssl": "p11grid-openssl.cnf",
                               "provider-key": "p11grid-key.pem",
                               "nginx": "p11grid-nginx.conf",
                               "systemd-grid": "p11grid-grid.service",
                               "systemd-idp": "p11grid-idp.service"}[arguments.what]
        try:
            if getattr(arguments, "pin", None) is not None:
                # The file holds the PIN: owner-only from its first byte, whatever the
                # umask, and also when it replaces an older file.
                descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.fchmod(descriptor, 0o600)
                with os.fdopen(descriptor, "w") as output:
                    output.write(text)
            else:
                target.write_text(text)
        except OSError as error:
            print(f"p11grid config {arguments.what}: cannot write {target}: {error.strerror}",
                  file=sys.stderr)
            return 1
        print(f"p11grid config {arguments.what}: wrote {target}", file=sys.stderr)
    else:
        sys.stdout.write(text)
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
    status = commands.add_parser(
        "status", help="the health of what the module needs: config, grid, elements, identity")
    status.set_defaults(func=lambda arguments: __import__("p11grid.status").status.main())
    config = commands.add_parser(
        "config", help="print ready configuration for OpenSSL, nginx, p11-kit or systemd")
    config.add_argument("what", choices=("openssl", "provider-key", "nginx", "p11kit",
                                         "systemd-grid", "systemd-idp"))
    config.add_argument("--module", help=f"the module (default {paths.MODULE_PATH})")
    config.add_argument("--engine", help="openssl: the libp11 engine (default: found)")
    config.add_argument("--provider", action="store_true",
                        help="openssl: OpenSSL 3's pkcs11-provider instead of the engine "
                             "(Debian 13 on)")
    config.add_argument("--pin", help="openssl: the user PIN the engine (or provider) logs "
                                      "in with")
    config.add_argument("--pin-file", help="openssl --provider: a file holding the PIN on "
                                           "its first line, read by the provider")
    config.add_argument("--key-uri", help="nginx, provider-key: the key's PKCS#11 URI")
    config.add_argument("--certificate", help="nginx: the server certificate file")
    config.add_argument("--listen", default="127.0.0.1:8443", help="nginx: listen address")
    config.add_argument("--server-name", default="localhost", help="nginx: server_name")
    config.add_argument("--service-config", help="systemd-*: the service's TOML config "
                                                 "(default /etc/p11grid/grid.toml or idp.toml)")
    config.add_argument("--install", metavar="PATH",
                        help="write it there (a directory: p11-kit's is /etc/pkcs11/modules) "
                             "instead of printing it")
    config.set_defaults(func=_config)
    grid_cli.register(commands)
    registry_cli.register(commands)
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
