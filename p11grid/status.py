"""`p11grid status`: is everything the module needs there and healthy? The module's own
config ($P11GRID_CONF) is read, and each thing it depends on is tried the way the module
would: the grid endpoints (TLS with the module's certificate, `hello`, `list`), the slots'
elements, and with `[identity]` the VM-Auth-Token (checked here, as the gate does) and
the OpenID provider (discovery). One line per check; exit status 0 only if all pass.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provider import config as module_config
from provider.return_values import ConfigError


@dataclass
class Report:
    lines: list[tuple[bool, str]] = field(default_factory=list)

    def check(self, what: str, run: Callable[[], str]) -> bool:
        try:
            detail = run()
        except Exception as error:  # a status tool reports every failure, whatever it is
            self.lines.append((False, f"{what}: {type(error).__name__}: {error}"))
            return False
        self.lines.append((True, f"{what}: {detail}"))
        return True

    @property
    def ok(self) -> bool:
        return all(passed for passed, _ in self.lines)


def _grid_checks(report: Report, loaded: module_config.ModuleConfig) -> None:
    from grid_backend.client import GridPool, GridSettings

    grid = loaded.grid
    assert grid is not None
    for host, port in grid.endpoints:
        pool = GridPool(GridSettings(endpoints=((host, port),), ca=Path(grid.ca),
                                     certificate=Path(grid.certificate), key=Path(grid.key),
                                     timeout=min(grid.timeout, 5.0), spin=0.0))

        def hello(pool: GridPool = pool) -> str:
            started = time.monotonic()
            answer = pool.call("hello", {}, idempotent=True)
            took = (time.monotonic() - started) * 1000
            return f"answers (protocol {answer['version']}, {took:.0f} ms), sees us as " \
                f"{answer['identity']}"

        if report.check(f"grid {host}:{port}", hello):
            listed = {e["seid"]: e["label"] for e in
                      pool.call("list", {}, idempotent=True)["elements"]}
            for element in loaded.secure_elements or []:
                seid = element.seid or element.label
                bound = seid in listed
                report.lines.append((bound, f"slot {element.label} (element {seid}): " + (
                    "bound to us" if bound else "not among the elements the grid lets us "
                    f"use ({', '.join(sorted(listed)) or 'none'})")))
            if not loaded.secure_elements:
                report.lines.append((True, "slots: discovered from the grid: "
                                           f"{', '.join(sorted(listed.values())) or 'none'}"))
        pool.close()


def _identity_checks(report: Report, loaded: module_config.ModuleConfig) -> None:
    identity = loaded.identity
    if identity is None:
        report.lines.append((True, "identity: no [identity] table; the grid sees only the "
                                   "TLS certificate"))
        return
    from idm.idp_client import fetch_discovery

    def provider() -> str:
        metadata = fetch_discovery(identity.idp, identity.ca, timeout=5.0)
        return f"discovery answers; token endpoint {metadata['token_endpoint']}"

    report.check(f"OpenID provider {identity.idp}", provider)
    if identity.vm_token is None:
        report.lines.append((True, f"VM-Auth-Token: handed out by the provider for "
                                   f"{identity.vm} (Option 1)"))
        return

    def token() -> str:
        from provider.module import identity_gate

        assert loaded.grid is not None and identity is not None
        checked = identity_gate(identity, loaded.grid.certificate).check_vm_token()
        left = checked.expires - datetime.datetime.now(datetime.UTC)
        return f"valid for {checked.subject}, {len(checked.checks)} checks, expires in " \
            f"{left.total_seconds() / 3600:.1f} h"

    report.check("VM-Auth-Token", token)


def run() -> Report:
    report = Report()
    try:
        loaded = module_config.load()
    except ConfigError as error:
        report.lines.append((False, f"module config: {error}"))
        return report
    report.lines.append((True, f"module config {loaded.path}: backend {loaded.backend}, "
                               f"{len(loaded.secure_elements)} configured slot(s)"))
    if loaded.backend != "grid":
        report.lines.append((True, "local backend: the elements are reached in-process"))
        return report
    _grid_checks(report, loaded)
    _identity_checks(report, loaded)
    return report


def main() -> int:
    report = run()
    for passed, line in report.lines:
        print(f"{'ok  ' if passed else 'FAIL'}  {line}")
    print("status: " + ("healthy" if report.ok else "NOT healthy"))
    return 0 if report.ok else 1
