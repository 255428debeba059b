"""An APDU transport whose card is one SEID on a remote RACS server.

connect = POWERON (locks the element to our RACS session), transmit = APDU with MORE=61
(the server chains GET RESPONSE), reset = RESET, disconnect = SHUTDOWN. Each call has a
deadline. When the TLS connection has dropped (server restart, idle timeout) the next
call reconnects and powers the element on again; the card then starts afresh, so the
caller must SELECT its application again, as after any reset. A call whose connection
breaks mid-way is not retried (it may have reached the card): it raises
TransportFailure.
"""

from __future__ import annotations

import threading
from pathlib import Path

from grid_backend.apdu import CardAbsent, TransportFailure
from grid_backend.racs.client import RacsClient, RacsUnreachable
from grid_backend.racs.protocol import Outcome, ProtocolViolation, ResultLine

# Answers to POWERON meaning "this card is not for you / not there", not "it broke". For
# an APDU the same classes mean a refused command on a present card: TransportFailure.
_REFUSALS = {Outcome.BAD_PARAMETER, Outcome.UNAUTHORIZED, Outcome.IN_USE}


class RacsTransport:
    """One card = one SEID of a RACS server, over one mutual-TLS connection."""

    def __init__(self, seid: str, host: str, port: int, cert: Path, key: Path, ca: Path, *,
                 deadline: float = 30.0, server_name: str | None = None):
        self.seid = seid
        self.name = f"racs://{host}:{port}/{seid}"
        self._client = RacsClient(host, port, cert, key, ca, timeout=deadline,
                                  server_name=server_name)
        self._powered = False
        self._lock = threading.Lock()  # one request at a time on the connection

    def _result(self, command: str, refusal_means_absent: bool = False) -> ResultLine:
        try:
            reply = self._client.request([command])
        except RacsUnreachable as exc:
            self._powered = False
            raise TransportFailure(f"{self.name}: {exc}") from exc
        except ProtocolViolation as exc:
            self._client.close()
            self._powered = False
            raise TransportFailure(f"{self.name}: {exc}") from exc
        result = reply.last
        if result.ok:
            return result
        text = f"{self.name}: RACS {result.format()}"
        if refusal_means_absent and result.outcome in _REFUSALS:
            raise CardAbsent(text)
        raise TransportFailure(text)

    def _power_on(self) -> bytes:
        if self._client.connected and self._client.idle_dropped():
            self._client.close()
            self._powered = False
        if not self._client.connected:
            try:
                self._client.connect()
            except RacsUnreachable as exc:
                raise TransportFailure(f"{self.name}: {exc}") from exc
            self._powered = False
        result = self._result(f"POWERON {self.seid}", refusal_means_absent=True)
        self._powered = True
        return _atr(result.text)

    def connect(self) -> bytes:
        with self._lock:
            return self._power_on()

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            if not self._powered or self._client.idle_dropped():
                self._client.close()
                self._power_on()
            result = self._result(f"APDU {self.seid} {apdu.hex().upper()} MORE=61")
            try:
                response = bytes.fromhex(result.text)
            except ValueError:
                raise TransportFailure(f"{self.name}: bad APDU response {result.text[:40]!r}"
                                       ) from None
            if len(response) < 2:
                raise TransportFailure(f"{self.name}: response without a status word")
            return response

    def reset(self, warm: bool = True) -> bytes:
        with self._lock:
            if not self._powered or self._client.idle_dropped():
                self._client.close()
                return self._power_on()  # a fresh session's card is freshly powered
            suffix = " WARM" if warm else ""
            return _atr(self._result(f"RESET {self.seid}{suffix}").text)

    def disconnect(self) -> None:
        with self._lock:
            try:
                if self._powered and self._client.connected:
                    self._client.request([f"SHUTDOWN {self.seid}"])
            except (RacsUnreachable, ProtocolViolation):
                pass  # the server powers off what a closed session held anyway
            finally:
                self._powered = False
                self._client.close()


def _atr(text: str) -> bytes:
    try:
        return bytes.fromhex(text.split()[0]) if text else b""
    except ValueError:
        return b""
