"""ISO 7816 APDUs and the transports that carry them to a card.

A transport moves command APDUs to one card and brings back the response APDU with its
status word (SW1 SW2) at the end. Transports: PC/SC through pyscard
(grid_backend/transports/pcsc.py) and RACS, a card on a remote RACS server
(grid_backend/transports/racs.py). APDU-capable elements (the PIV card driver) take any
transport; the RACS server exposes any transport.
"""

from __future__ import annotations

from typing import Protocol

from grid_backend.secure_element import ElementAbsent, ElementFailure

SW_OK = 0x9000


class CardAbsent(ElementAbsent):
    """No card in the reader, the reader is gone, or the remote server refuses the card."""


class TransportFailure(ElementFailure):
    """The transport broke while talking to a present card (timeout, I/O, protocol)."""


class ApduTransport(Protocol):
    """One card reachable by APDUs. Every call has a deadline; none hangs."""

    name: str  # human-readable: reader name, or racs://host:port/SEID

    def connect(self) -> bytes:
        """Power the card on (or take it); return its ATR."""

    def transmit(self, apdu: bytes) -> bytes:
        """Send one command APDU; return the response data followed by SW1 SW2."""

    def reset(self, warm: bool = True) -> bytes:
        """Reset the card; return its ATR."""

    def disconnect(self) -> None:
        """Release the card (power off or unlock). Idempotent."""

