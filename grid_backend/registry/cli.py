"""`p11grid db upgrade|status`: the registry's schema version, and the migrations that
bring it to this p11grid's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from grid_backend.registry import (
    DEFAULT_REGISTRY,
    RegistryError,
    migrations,
    open_database,
    registry_location,
)


def _location(arguments: argparse.Namespace) -> str:
    """--registry, else the [grid] registry of --config, else $P11GRID_REGISTRY, else the
    default SQLite file."""
    if arguments.registry:
        return str(arguments.registry)
    if arguments.config:
        from grid_backend.service.config import GridConfigError, load

        try:
            return str(load(Path(arguments.config)).registry)
        except GridConfigError as exc:
            raise RegistryError(str(exc)) from None
    return registry_location(None)


def upgrade(arguments: argparse.Namespace) -> int:
    database = open_database(_location(arguments), create=True)
    try:
        latest = migrations.latest()
        before = migrations.status(database)
        print(f"registry {database.display}: schema version {before}; this p11grid's is "
              f"{latest}", flush=True)
        applied = migrations.upgrade(database, say=lambda line: print(line, flush=True))
        after = migrations.status(database)
    finally:
        database.close()
    if not applied:
        print(f"registry {database.display}: already at version {after}; nothing to do")
    else:
        print(f"registry {database.display}: schema version {after} (current)")
    return 0


def status(arguments: argparse.Namespace) -> int:
    """Exit status 0 when the schema is the one this p11grid needs, 1 otherwise."""
    database = open_database(_location(arguments), create=False)
    try:
        version = migrations.status(database)
    finally:
        database.close()
    latest = migrations.latest()
    if version == latest:
        print(f"registry {database.display}: schema version {version} (current)")
        return 0
    if version > latest:
        print(f"registry {database.display}: schema version {version}, newer than this "
              f"p11grid's ({latest}): run a newer p11grid")
        return 1
    print(f"registry {database.display}: schema version {version}; this p11grid needs "
          f"{latest}: run `p11grid db upgrade --registry {database.display}`")
    for migration in migrations.available():
        if migration.version > version:
            print(f"  missing: {migration.version} ({migration.name})")
    return 1


def _guarded(action: Any) -> Any:
    def run(arguments: argparse.Namespace) -> int:
        try:
            return int(action(arguments))
        except RegistryError as exc:
            print(f"p11grid db {arguments.db_action}: {exc}", file=sys.stderr)
            return 1

    return run


def register(commands: Any) -> None:
    db = commands.add_parser("db", help="the registry's schema: its version, and upgrades")
    actions = db.add_subparsers(dest="db_action", required=True)
    for name, action, text in (
            ("upgrade", upgrade, "apply the missing schema migrations, one transaction each"),
            ("status", status, "the registry's schema version and the one this p11grid "
                               "needs (exit status 1 if they differ)")):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("--registry", help="a SQLite file or a postgresql:// URL (default "
                                               f"$P11GRID_REGISTRY, else {DEFAULT_REGISTRY})")
        parser.add_argument("--config", help="take the registry from this grid service "
                                             "config's [grid] table")
        parser.set_defaults(func=_guarded(action))
