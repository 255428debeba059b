"""`p11grid grid serve|add-se|remove-se|keygen|bind|admin|list|identities|revoke|
revocations|audit`: run and administer the grid."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from grid_backend.elements import DRIVERS, open_element
from grid_backend.registry import (
    DEFAULT_REGISTRY,
    ElementRecord,
    KeyRecord,
    Registry,
    RegistryError,
    is_postgres,
    open_registry,
    registry_location,
)
from grid_backend.secure_element import ElementError
from idm.chain import ChainRefused

log = logging.getLogger("p11grid.grid")


def _registry(arguments: argparse.Namespace) -> Registry:
    location = registry_location(arguments.registry)
    if not is_postgres(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
    return open_registry(location, arguments.node)


def _handler(path: Path | None) -> logging.Handler:
    if path is not None:
        return logging.FileHandler(path, encoding="utf-8")
    if os.path.exists("/dev/log"):
        return logging.handlers.SysLogHandler(address="/dev/log")
    return logging.StreamHandler(sys.stderr)


def _relying_party(config: Any) -> Any:
    """The identity checks of `[identity]`, or None (and a warning) without that table."""
    if config.identity is None:
        log.warning("no [identity] table in %s: sessions open without identity tokens",
                    config.path)
        return None
    import datetime

    from idm.chain import TrustAnchor
    from idm.identity import Identity
    from idm.relying_party import RelyingParty

    settings = config.identity
    ca_dir = settings.ca_dir

    def anchor() -> TrustAnchor:
        return TrustAnchor.load(ca_dir / "ca.pem", ca_dir / "crl.pem")

    anchor()  # fail at start, not at the first caller, if the CA files are missing
    return RelyingParty(anchor, Identity.parse(settings.sp), settings.idp_issuer,
                        settings.idp_jwks,
                        datetime.timedelta(seconds=settings.max_token_lifetime))


def _sealing(config: Any) -> Any:
    """The grid's authority key for result containers, if `[identity]` names one."""
    if config.identity is None or config.identity.result_authority_key is None:
        return None
    from cryptography.hazmat.primitives import serialization

    from grid_backend.service.server import ResultSealing
    from idm.container import SoftwareAuthority

    key = serialization.load_pem_private_key(
        config.identity.result_authority_key.read_bytes(), None)
    return ResultSealing(SoftwareAuthority(key), config.identity.result_header)  # type: ignore[arg-type]


def serve(arguments: argparse.Namespace) -> int:
    from grid_backend.service.config import GridConfigError, load
    from grid_backend.service.server import GridServer, GridService

    try:
        config = load(Path(arguments.config))
    except GridConfigError as exc:
        print(f"p11grid grid serve: {exc}", file=sys.stderr)
        return 2
    service_log = _handler(config.log_file)
    service_log.setFormatter(logging.Formatter(
        "%(asctime)s p11grid-grid[%(process)d] %(levelname)s %(name)s: %(message)s"))
    grid_logger = logging.getLogger("p11grid")
    grid_logger.addHandler(service_log)
    grid_logger.setLevel(logging.INFO)
    audit_logger = logging.getLogger("p11grid.audit")
    audit_logger.propagate = False
    # With an audit_log file the server appends to it itself; this is the fallback.
    audit_handler = _handler(None)
    audit_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    audit_logger.addHandler(audit_handler)
    try:
        registry = open_registry(config.registry, config.node)
        server = GridServer(config, GridService(registry, relying_party=_relying_party(config),
                                                sealing=_sealing(config)))
        server.start()
    except (RegistryError, OSError, ValueError, ChainRefused) as exc:
        print(f"p11grid grid serve: cannot start: {exc}", file=sys.stderr)
        return 1
    if config.metrics is not None:
        from idm.metrics import serve_metrics

        try:
            serve_metrics(server.metrics, config.metrics.host, config.metrics.port)
        except OSError as exc:
            server.stop()
            print(f"p11grid grid serve: cannot serve metrics on {config.metrics}: {exc}",
                  file=sys.stderr)
            return 1
        log.info("Prometheus metrics on http://%s/metrics", config.metrics)
    racs = None
    if config.racs is not None:
        from grid_backend.racs.hosting import start_racs

        racs = start_racs(config.racs, server.service)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if config.pid_file is not None:
        config.pid_file.write_text(f"{os.getpid()}\n")
    print(f"p11grid grid: serving on {config.listen.host}:{server.port}", flush=True)
    try:
        # A timed wait: the main thread wakes regularly, so a pending signal is handled
        # even if it arrived while the thread was not waiting on the event.
        while not stop.wait(0.5):
            pass
    finally:
        # The grid's callers first; the RACS sessions after, within a short bound.
        server.stop()
        if racs is not None:
            racs.stop()
        if config.pid_file is not None:
            config.pid_file.unlink(missing_ok=True)
        log.info("grid service stopped")
    return 0


def _settings(arguments: argparse.Namespace) -> dict[str, Any]:
    environment = {}
    for item in arguments.env or []:
        name, _, value = item.partition("=")
        if not name or not _:
            raise RegistryError(f"--env takes NAME=VALUE, not {item!r}")
        environment[name] = value
    if arguments.driver == "pkcs11":
        if not arguments.library or not arguments.token_label:
            raise RegistryError("--driver pkcs11 needs --library and --token-label")
        return {"library": arguments.library, "token_label": arguments.token_label,
                "environment": environment}
    settings: dict[str, Any] = json.loads(arguments.settings or "{}")
    return settings


def add_se(arguments: argparse.Namespace) -> int:
    registry = _registry(arguments)
    record = ElementRecord(arguments.seid, arguments.label or arguments.seid, arguments.driver,
                           _settings(arguments), arguments.node)
    registry.add_element(record)
    print(f"added secure element {record.seid} ({record.driver}, label {record.label}"
          + (f", on node {record.node}" if record.node else "") + ")")
    return 0


def keygen(arguments: argparse.Namespace) -> int:
    registry = _registry(arguments)
    record = registry.element(arguments.seid)
    piv = record.driver == "piv"
    management_key: bytes | None = None
    # The management key is never printed: the messages say where it comes from, not what.
    if piv:
        text = arguments.management_key or os.environ.get("P11GRID_PIV_MANAGEMENT_KEY")
        if not text:
            print("p11grid grid keygen: a PIV card generates keys only after its management "
                  "key (9B) is authenticated: give it with --management-key HEX or "
                  "$P11GRID_PIV_MANAGEMENT_KEY", file=sys.stderr)
            return 2
        try:
            management_key = bytes.fromhex(text)
        except ValueError:
            management_key = None
        if management_key is None or len(management_key) != 24:
            print("p11grid grid keygen: the PIV management key is 24 bytes (AES-192), "
                  "48 hex digits", file=sys.stderr)
            return 2
    elif arguments.management_key:
        print("p11grid grid keygen: --management-key is for piv elements only",
              file=sys.stderr)
        return 2
    if arguments.replicate_to_node and record.driver != "pkcs11":
        # A card never lets a private key out, even wrapped: one key and one
        # certificate per card (docs/registry.md, "Replicated elements").
        print(f"p11grid grid keygen: --replicate-to-node copies keys wrapped between PKCS#11 "
              f"tokens; a {record.driver} element cannot export one: generate a key in each "
              "element instead", file=sys.stderr)
        return 2
    replicas = []
    for node in arguments.replicate_to_node or ():
        placements = open_registry(registry_location(arguments.registry), node)
        try:
            replicas.append(placements.element(arguments.seid))
        finally:
            placements.close()
    for replica in replicas:
        if replica.driver != "pkcs11":
            raise RegistryError(f"{arguments.seid} on node {replica.node} is a "
                                f"{replica.driver} element: keys are copied only between "
                                "PKCS#11 tokens")
    element: Any = open_element(record.driver, dict(record.settings))
    if not hasattr(element, "generate_key"):
        raise RegistryError(f"the {record.driver} driver cannot generate keys")
    pin = arguments.pin or os.environ.get("P11GRID_PIN")
    if not pin:
        raise RegistryError("give the element's user PIN with --pin or $P11GRID_PIN")
    key_id = bytes.fromhex(arguments.id)
    try:
        if not piv:
            targets = [(open_element(r.driver, dict(r.settings)), pin) for r in replicas]
            try:
                element.generate_key(pin, arguments.label, key_id, arguments.kind,
                                     replicate_to=targets)
            finally:
                for target, _ in targets:
                    target.close()
            registry.add_key(KeyRecord(record.seid, arguments.label, key_id.hex(),
                                       arguments.kind))
            where = f"{record.seid} on node {_node(record.node)}"
            print(f"generated {arguments.kind} key {arguments.label} (id {key_id.hex()}) "
                  f"inside {where}")
            for replica in replicas:
                print(f"copied it wrapped into {record.seid} on node {_node(replica.node)} "
                      f"(token {replica.settings.get('token_label')})")
            return 0
        from grid_backend.elements.piv_card import piv_slot

        slot = piv_slot(key_id)  # a bad id stops here, before the card
        slot_name = f"{slot.key_reference:02x}"
        object_id = slot.object_id.hex()  # the CKA_ID the card's objects carry
        # The slot's entry under any spelling ("9C") gives way to the new one.
        labels = {name: label for name, label in dict(record.settings.get("labels") or {})
                  .items() if str(name).lower() != slot_name}
        if arguments.label in labels.values() or any(
                key.label == arguments.label and key.key_id != object_id
                for key in registry.keys(record.seid)):
            raise RegistryError(f"label {arguments.label!r} already names another key of "
                                f"{record.seid}")
        element.generate_key(pin, arguments.label, key_id, arguments.kind,
                             management_key=management_key)
        # The slot's label in the settings: the grid shows the key by it after a restart.
        labels[slot_name] = arguments.label
        registry.update_element(dataclasses.replace(
            record, settings={**record.settings, "labels": labels}))  # this node's placement
        registry.remove_keys(record.seid, object_id)  # the slot's previous key is gone
        registry.add_key(KeyRecord(record.seid, arguments.label, object_id, arguments.kind))
        print(f"generated {arguments.kind} key {arguments.label} (id {object_id}, slot "
              f"{slot_name}, self-signed certificate) inside {record.seid}")
        return 0
    finally:
        element.close()


def bind(arguments: argparse.Namespace) -> int:
    registry = _registry(arguments)
    if arguments.unbind:
        registry.unbind(arguments.identity, arguments.seid)
        print(f"unbound {arguments.identity} from {arguments.seid}")
    else:
        registry.bind(arguments.identity, arguments.seid)
        print(f"bound {arguments.identity} to {arguments.seid}")
    return 0


def admin(arguments: argparse.Namespace) -> int:
    registry = _registry(arguments)
    if arguments.remove:
        if not registry.remove_administrator(arguments.identity, arguments.seid):
            raise RegistryError(f"{arguments.identity} does not administer {arguments.seid}")
        print(f"{arguments.identity} no longer administers {arguments.seid}")
        return 0
    registry.add_administrator(arguments.identity, arguments.seid)
    print(f"{arguments.identity} administers {arguments.seid} (RACS: every APDU the "
          "element's filters allow)")
    return 0


def remove_se(arguments: argparse.Namespace) -> int:
    registry = _registry(arguments)
    if not registry.remove_element(arguments.seid):
        raise RegistryError(f"no secure element {arguments.seid!r} on node "
                            f"{_node(registry.node)}")
    left = [p.node for p in registry.placements() if p.seid == arguments.seid]
    if left:
        print(f"removed {arguments.seid} from node {_node(registry.node)}; still placed on "
              f"{', '.join(_node(node) for node in left)}")
    else:
        print(f"removed {arguments.seid} with its bindings, key records and administrators; "
              "the keys themselves stay inside the element (destroy them there if they must "
              "go). A running grid node stops serving it once restarted.")
    return 0


def _node(name: str) -> str:
    return name or '""'  # the default node, shown as such rather than as nothing


def list_registry(arguments: argparse.Namespace) -> int:
    """Every node's placements, each seid's keys, bindings and administrators once."""
    registry = _registry(arguments)
    bindings = registry.bindings()
    placements = registry.placements()
    for index, record in enumerate(placements):
        print(f"{record.seid}\t{record.driver}\tlabel={record.label}\t"
              f"node={_node(record.node)}")
        if index + 1 < len(placements) and placements[index + 1].seid == record.seid:
            continue  # the element's other placements first
        for key in registry.keys(record.seid):
            print(f"  key {key.label}\tid={key.key_id}\t{key.kind}")
        for identity, seid in bindings:
            if seid == record.seid:
                print(f"  bound to {identity}")
        for identity in registry.administrators(record.seid):
            print(f"  administered by {identity}")
    return 0


def identities(arguments: argparse.Namespace) -> int:
    for record in _registry(arguments).identities():
        print(f"{record.uri}\t{record.kind}\tenrolled {record.enrolled}")
    return 0


def revoke(arguments: argparse.Namespace) -> int:
    """Record a certificate as revoked: every grid node sharing the registry refuses it
    at the next authorize, without waiting for the CA's next revocation list."""
    if arguments.certificate:
        from cryptography import x509

        from idm.identity import IdentityError, identity_of

        try:
            certificate = x509.load_pem_x509_certificate(
                Path(arguments.certificate).read_bytes())
        except OSError as exc:
            raise RegistryError(f"cannot read {arguments.certificate}: {exc.strerror}"
                                ) from None
        serial = certificate.serial_number
        try:
            identity = identity_of(certificate).uri
        except IdentityError:
            identity = certificate.subject.rfc4514_string()
    elif arguments.serial and arguments.identity:
        serial = int(arguments.serial.replace(":", ""), 16)
        identity = arguments.identity
    else:
        raise RegistryError("give --certificate PEMFILE, or --serial HEX and --identity")
    registry = _registry(arguments)
    if registry.revoke(serial, identity, arguments.reason):
        print(f"revoked certificate {serial:x} of {identity} ({arguments.reason})")
    else:
        print(f"certificate {serial:x} of {identity} was already revoked")
    return 0


def revocations(arguments: argparse.Namespace) -> int:
    for record in _registry(arguments).revocations():
        print(f"{record.serial:x}\t{record.identity}\t{record.reason}\trevoked "
              f"{record.revoked}")
    return 0


def audit(arguments: argparse.Namespace) -> int:
    """The most recent audit rows of every node, oldest of them first."""
    for row in reversed(_registry(arguments).audit(arguments.limit)):
        mechanism = f"\tmechanism=0x{row.mechanism:x}" if row.mechanism is not None else ""
        key = f"\tkey={row.key}" if row.key is not None else ""
        print(f"{row.at}\tnode={_node(row.node)}\t{row.who}\t{row.operation}\t"
              f"seid={row.seid}{key}{mechanism}\t{row.result}\t{row.duration_ms:.3f} ms")
    return 0


def _guarded(action: Any) -> Any:
    def run(arguments: argparse.Namespace) -> int:
        try:
            return int(action(arguments))
        except (RegistryError, ElementError, ValueError) as exc:
            print(f"p11grid grid {arguments.grid_action}: {exc}", file=sys.stderr)
            return 1

    return run


def register(commands: Any) -> None:
    grid = commands.add_parser("grid", help="run and administer the grid of secure elements")
    actions = grid.add_subparsers(dest="grid_action", required=True)

    def with_registry(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--registry", help="a SQLite file or a postgresql:// URL "
                                               f"(default $P11GRID_REGISTRY, else "
                                               f"{DEFAULT_REGISTRY})")
        parser.add_argument("--node", default=os.environ.get("P11GRID_NODE", ""),
                            help="the grid node whose placements to act on (default "
                                 "$P11GRID_NODE, else \"\")")
        return parser

    serve_parser = actions.add_parser("serve", help="run the grid service")
    serve_parser.add_argument("--config", required=True, help="the service's TOML config")
    serve_parser.set_defaults(func=serve)

    add = with_registry(actions.add_parser("add-se", help="register a secure element"))
    add.add_argument("--seid", required=True, help="the element's id at the grid")
    add.add_argument("--label", help="token label shown to callers (default: the seid)")
    add.add_argument("--driver", required=True, choices=DRIVERS)
    add.add_argument("--library", help="pkcs11: the PKCS#11 library")
    add.add_argument("--token-label", help="pkcs11: the token's label in that library")
    add.add_argument("--env", action="append", metavar="NAME=VALUE",
                     help="pkcs11: environment for the library (e.g. SOFTHSM2_CONF=...)")
    add.add_argument("--settings", help="piv: the driver's settings as JSON")
    add.set_defaults(func=_guarded(add_se))

    remove = with_registry(actions.add_parser(
        "remove-se", help="forget this node's placement of an element (with its last "
                          "placement: its bindings, key records and administrators)"))
    remove.add_argument("--seid", required=True)
    remove.set_defaults(func=_guarded(remove_se))

    generate = with_registry(actions.add_parser(
        "keygen", help="generate a key pair inside an element (never imported)"))
    generate.add_argument("--seid", required=True)
    generate.add_argument("--label", required=True)
    generate.add_argument("--id", required=True, help="CKA_ID, hex")
    generate.add_argument("--kind", required=True, choices=("rsa2048", "rsa3072", "ec256",
                                                            "ec384"))
    generate.add_argument("--pin", help="the element's user PIN (default $P11GRID_PIN); "
                                        "replicas take the same PIN")
    generate.add_argument("--replicate-to-node", action="append", metavar="NODE",
                          help="pkcs11: copy the new key, wrapped, into this seid's placement "
                               "on NODE too (repeatable); the key is extractable only until "
                               "the copies are made")
    generate.add_argument("--management-key", metavar="HEX",
                          help="piv: the card management key (9B), AES-192 as 48 hex digits "
                               "(default $P11GRID_PIV_MANAGEMENT_KEY)")
    generate.set_defaults(func=_guarded(keygen))

    binding = with_registry(actions.add_parser(
        "bind", help="let an identity (spiffe://.../vm/NAME, or a certificate CN) use an element"))
    binding.add_argument("--identity", required=True)
    binding.add_argument("--seid", required=True)
    binding.add_argument("--unbind", action="store_true", help="remove the binding instead")
    binding.set_defaults(func=_guarded(bind))

    administrator = with_registry(actions.add_parser(
        "admin", help="let an identity (a certificate CN for RACS) administer an element"))
    administrator.add_argument("--identity", required=True)
    administrator.add_argument("--seid", required=True)
    administrator.add_argument("--remove", action="store_true",
                               help="remove the administrator instead")
    administrator.set_defaults(func=_guarded(admin))

    listing = with_registry(actions.add_parser(
        "list", help="elements (each node's placements), keys and bindings"))
    listing.set_defaults(func=_guarded(list_registry))

    known = with_registry(actions.add_parser("identities", help="the identities ever bound"))
    known.set_defaults(func=_guarded(identities))

    revoking = with_registry(actions.add_parser(
        "revoke", help="refuse a certificate at once on every node sharing the registry"))
    revoking.add_argument("--certificate", metavar="PEMFILE", help="the certificate to refuse")
    revoking.add_argument("--serial", metavar="HEX", help="its serial, without the file")
    revoking.add_argument("--identity", help="with --serial: whose certificate it is")
    revoking.add_argument("--reason", default="unspecified", help="recorded with it")
    revoking.set_defaults(func=_guarded(revoke))

    revoked = with_registry(actions.add_parser("revocations",
                                               help="the certificates revoked in the registry"))
    revoked.set_defaults(func=_guarded(revocations))

    auditing = with_registry(actions.add_parser(
        "audit", help="recent audit rows of every node, from the registry"))
    auditing.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    auditing.set_defaults(func=_guarded(audit))
