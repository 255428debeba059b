"""The virtual card's side of vsmartcard's vpcd protocol (vpcd is the reader in pcscd).

vpcd listens on TCP (35963 by default); the card connects to it as a client. Every
message is a 2-byte big-endian length and a payload. A 1-byte payload is a control
message: 00 power off, 01 power on, 02 reset, 04 get ATR (answered with the ATR). A longer
payload is a command APDU, answered with its response APDU. Nothing else is answered.
"""

from __future__ import annotations

import logging
import socket
import threading

from grid_backend.virtual_piv.applet import ATR, PivApplet

log = logging.getLogger("p11grid.virtual_piv")

POWER_OFF, POWER_ON, RESET, GET_ATR = 0x00, 0x01, 0x02, 0x04
POLL_SECONDS = 0.5  # how often a blocked read looks at the stop flag
MAX_BACKOFF_SECONDS = 5.0


class VpcdGone(Exception):
    """vpcd closed the connection."""


def _receive_exactly(sock: socket.socket, size: int, stop: threading.Event) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        if stop.is_set():
            raise VpcdGone("stopping")
        try:
            chunk = sock.recv(size - len(chunks))
        except TimeoutError:
            continue
        if not chunk:
            raise VpcdGone("connection closed")
        chunks += chunk
        _quick_ack(sock)
    return bytes(chunks)


def _quick_ack(sock: socket.socket) -> None:
    # vpcd writes a message's length and payload separately; with Nagle on its side and
    # delayed ACKs on ours every APDU would wait 40 ms. Linux clears QUICKACK by itself,
    # so it is set again after every read.
    if hasattr(socket, "TCP_QUICKACK"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(len(payload).to_bytes(2, "big") + payload)


def serve_connection(sock: socket.socket, card: PivApplet, stop: threading.Event) -> None:
    """Answer vpcd on one connection until it closes or `stop` is set."""
    sock.settimeout(POLL_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _quick_ack(sock)
    while not stop.is_set():
        length = int.from_bytes(_receive_exactly(sock, 2, stop), "big")
        payload = _receive_exactly(sock, length, stop)
        if length == 1:
            control = payload[0]
            if control == POWER_OFF:
                card.power_off()
            elif control == POWER_ON:
                card.power_on()
            elif control == RESET:
                card.reset()
            elif control == GET_ATR:
                _send(sock, ATR)
            else:
                log.warning("unknown vpcd control message %02X", control)
        elif length:
            _send(sock, card.process(payload))


def run(card: PivApplet, host: str, port: int, stop: threading.Event) -> None:
    """Stay connected to vpcd, reconnecting with backoff, until `stop` is set."""
    backoff = 0.1
    while not stop.is_set():
        try:
            sock = socket.create_connection((host, port), timeout=2.0)
        except OSError as exc:
            log.debug("vpcd at %s:%d not reachable (%s); retry in %.1f s", host, port, exc,
                      backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            continue
        log.info("connected to vpcd at %s:%d", host, port)
        backoff = 0.1
        try:
            serve_connection(sock, card, stop)
        except (VpcdGone, OSError) as exc:
            if not stop.is_set():
                log.info("vpcd connection ended: %s", exc)
        finally:
            sock.close()
            card.power_off()  # the reader is gone: so is the card's power
