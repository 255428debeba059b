"""The grid service's RACS server: the `[racs]` table of `p11grid grid serve`'s config.

What it exposes: every registry element whose driver is `piv` and whose transport is
`pcsc`, under SEID = the element's seid, each through a PC/SC handle of its own to the
same reader in shared mode (the grid's PIV driver keeps its own handle). Elements are
read from the registry once, when the service starts.

Who may use what (`RegistryAuthorizer`): the client certificate's CN may use an exposed
element when the registry binds that CN to it (`p11grid grid bind --identity CN --seid S`)
or names the CN an administrator of it (the `administrator` table; the sandbox makes
`racs-admin` the administrator of every element it exposes). No APDU filters.

Sharing a card: a RACS client and the grid's PIV driver can interleave APDUs on the same
card. POWERON only locks the element among RACS sessions, and SHUTDOWN or a session's end
resets the card; the PIV driver then selects its application and verifies its PIN again.

The server runs on an asyncio loop in a thread of its own, next to the grid's threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from grid_backend.apdu import ApduTransport
from grid_backend.racs.authorization import Authorizer, SeidSet
from grid_backend.racs.server import RacsServer, RacsServerConfig
from grid_backend.registry import Registry
from grid_backend.service.config import RacsSettings
from grid_backend.service.server import GridService

log = logging.getLogger("p11grid.grid.racs")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0  # a service being stopped must not wait long for RACS sessions


class RegistryAuthorizer(Authorizer):
    """RACS authorization from the grid's registry: bindings and administrators by CN."""

    def __init__(self, registry: Registry, exposed: set[str]) -> None:
        self.registry = registry
        self.exposed = exposed

    def may_use(self, cn: str, seid: str) -> bool:
        if not cn or seid not in self.exposed:
            return False
        return seid in self.registry.allowed([cn]) or cn in self.registry.administrators(seid)

    def allowed(self, cn: str) -> SeidSet:
        return {seid for seid in self.exposed if self.may_use(cn, seid)}


def apdu_elements(registry: Registry) -> dict[str, ApduTransport]:
    """SEID -> a PC/SC transport of its own, for each PIV element on PC/SC."""
    from grid_backend.transports.pcsc import PcscTransport

    elements: dict[str, ApduTransport] = {}
    for record in registry.elements():
        if record.driver == "piv" and record.settings.get("transport", "pcsc") == "pcsc":
            elements[record.seid] = PcscTransport(str(record.settings["reader"]))
    return elements


class HostedRacs:
    """A RacsServer on its own event loop in a daemon thread."""

    def __init__(self, config: RacsServerConfig) -> None:
        self.server = RacsServer(config)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="racs-server", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as exc:  # handed to start() in the caller's thread
            self._failure = exc
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    def start(self) -> HostedRacs:
        self._thread.start()
        if not self._started.wait(START_TIMEOUT):
            raise RuntimeError(f"the RACS server did not start within {START_TIMEOUT:.0f} s")
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            # Ends the sessions, which power their elements off.
            asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(
                STOP_TIMEOUT)
        except Exception as exc:  # stopping anyway
            log.warning("RACS server did not close cleanly: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT)


def start_racs(settings: RacsSettings, service: GridService) -> HostedRacs:
    """Serve the grid's APDU-capable elements over RACS; OSError if the port is taken."""
    elements = apdu_elements(service.registry)
    config = RacsServerConfig(
        cert=settings.tls.certificate, key=settings.tls.key, ca=settings.tls.client_ca,
        elements=elements, authorizer=RegistryAuthorizer(service.registry, set(elements)),
        host=settings.listen.host, port=settings.listen.port)
    hosted = HostedRacs(config).start()
    log.info("RACS server on %s:%d exposing %s", settings.listen.host, hosted.port,
             ", ".join(sorted(elements)) or "no elements")
    return hosted
