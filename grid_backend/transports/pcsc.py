"""An APDU transport over PC/SC (pcsc-lite's pcscd), through pyscard.

Deadlines. pyscard's calls block inside libpcsclite, and only SCardGetStatusChange takes a
timeout of its own; SCardEstablishContext, SCardConnect, SCardTransmit, SCardReconnect and
SCardStatus wait for pcscd as long as it takes, and a stopped pcscd (or a card that never
answers) would hang them. So every PC/SC call of a transport runs on the transport's own
worker thread (a daemon thread; pyscard releases the GIL while it waits), and the caller
waits for it only until its deadline. When a call overruns, the transport raises
TransportFailure and forgets the worker, its PC/SC context and its card handle: they
cannot be used while the stuck call holds them, and closing them could block as well.
The abandoned thread ends when pcscd answers or goes away (its socket closes); being a
daemon, it never delays the process's exit. The next connect() starts over with a fresh
worker and context. Waiting for a card uses SCardGetStatusChange's own timeout.

Failures: no reader of that name, no card, card removed, pcscd not running -> CardAbsent;
anything else (timeouts, protocol errors, a card reset by another application) ->
TransportFailure. `CardReset` (a TransportFailure) says the APDU was *not* sent because
another application reset the card: the card lost its session state (selected
application, PIN status), and the same APDU may be sent again after re-establishing it.

Disconnect resets the card (SCARD_RESET_CARD) so that a verified PIN does not outlive
our use of it for the next application that connects.

The socket of pcscd is libpcsclite's default (/run/pcscd/pcscd.comm) or the path in the
PCSCLITE_CSOCK_NAME environment variable; libpcsclite reads it once per process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from smartcard import scard

from grid_backend.apdu import CardAbsent, TransportFailure

log = logging.getLogger("p11grid.transport.pcsc")

T = TypeVar("T")

_ABSENT = frozenset(
    getattr(scard, name) for name in (
        "SCARD_E_NO_SMARTCARD", "SCARD_W_REMOVED_CARD", "SCARD_E_UNKNOWN_READER",
        "SCARD_E_READER_UNAVAILABLE", "SCARD_E_NO_READERS_AVAILABLE", "SCARD_E_NO_SERVICE",
        "SCARD_E_SERVICE_STOPPED", "SCARD_E_UNKNOWN_CARD")
    if hasattr(scard, name))
_PROTOCOLS = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1


class CardReset(TransportFailure):
    """Another application reset the card; the APDU was not sent."""

    apdu_sent = False


def _message(hresult: int) -> str:
    try:
        return f"{scard.SCardGetErrorMessage(hresult)} (0x{hresult & 0xFFFFFFFF:08X})"
    except Exception:  # the message is only for the log line
        return f"0x{hresult & 0xFFFFFFFF:08X}"


class _Worker:
    """One daemon thread running PC/SC calls in order; callers wait with a deadline."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=f"pcsc {name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except BaseException as exc:  # handed to the caller, who decides
                future.set_exception(exc)

    def call(self, function: Callable[[], T], seconds: float) -> T:
        future: Future[T] = Future()
        self._jobs.put((function, future))
        return future.result(timeout=seconds)  # FutureTimeout when overrun

    def stop(self) -> None:
        self._jobs.put(None)


class PcscTransport:
    """The card in the first PC/SC reader whose name contains `reader` (an exact name wins)."""

    def __init__(self, reader: str, *, timeout: float = 15.0, connect_timeout: float = 5.0,
                 card_wait: float = 0.0, exclusive: bool = False) -> None:
        self.reader_pattern = reader
        self.name = reader
        self.timeout = timeout  # per APDU: a card's RSA-2048 private operation included
        self.connect_timeout = connect_timeout
        self.card_wait = card_wait  # how long connect() waits for a card to be inserted
        self.share = scard.SCARD_SHARE_EXCLUSIVE if exclusive else scard.SCARD_SHARE_SHARED
        self._worker: _Worker | None = None
        self._context: int | None = None
        self._card: int | None = None
        self._protocol = 0
        self._lock = threading.Lock()  # one exchange at a time on this card handle

    # The worker and its deadline -------------------------------------------------------

    def _call(self, what: str, function: Callable[[], T], seconds: float) -> T:
        if self._worker is None:
            self._worker = _Worker(self.name)
        try:
            return self._worker.call(function, seconds)
        except FutureTimeout:
            self._abandon()
            raise TransportFailure(
                f"{self.name}: {what} got no answer from pcscd within {seconds:.1f} s") from None

    def _abandon(self) -> None:
        """Forget a worker stuck in pcscd, with the context and card it holds."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()  # it leaves when its stuck call returns
        self._context = self._card = None

    def _check(self, hresult: int, what: str) -> None:
        if hresult == scard.SCARD_S_SUCCESS:
            return
        if hresult in _ABSENT:
            raise CardAbsent(f"{self.name}: {what}: {_message(hresult)}")
        raise TransportFailure(f"{self.name}: {what}: {_message(hresult)}")

    # ApduTransport -----------------------------------------------------------------------

    def connect(self) -> bytes:
        with self._lock:
            if self._card is not None:
                return self._atr()
            deadline = time.monotonic() + self.connect_timeout + self.card_wait
            if self._context is None:
                hresult, context = self._call(
                    "SCardEstablishContext",
                    lambda: scard.SCardEstablishContext(scard.SCARD_SCOPE_USER),
                    self.connect_timeout)
                self._check(hresult, "establishing a PC/SC context")
                self._context = context
            context = self._context
            reader = self._find_reader(context)
            self.name = reader
            self._wait_for_card(context, reader, deadline)
            hresult, card, protocol = self._call(
                "SCardConnect",
                lambda: scard.SCardConnect(context, reader, self.share, _PROTOCOLS),
                max(0.1, deadline - time.monotonic()))
            self._check(hresult, "connecting to the card")
            self._card, self._protocol = card, protocol
            return self._atr()

    def _find_reader(self, context: int) -> str:
        hresult, readers = self._call("SCardListReaders",
                                      lambda: scard.SCardListReaders(context, []),
                                      self.connect_timeout)
        if hresult == getattr(scard, "SCARD_E_NO_READERS_AVAILABLE", None):
            readers = []
        else:
            self._check(hresult, "listing readers")
        if self.reader_pattern in readers:
            return self.reader_pattern
        for reader in readers:
            if self.reader_pattern in reader:
                return str(reader)
        raise CardAbsent(f"no PC/SC reader named like {self.reader_pattern!r} "
                         f"(readers: {', '.join(readers) or 'none'})")

    def _wait_for_card(self, context: int, reader: str, deadline: float) -> None:
        state = scard.SCARD_STATE_UNAWARE
        while True:
            remaining = deadline - time.monotonic()
            # The first round only reads the state; later ones wait for a change.
            wait_ms = 0 if state == scard.SCARD_STATE_UNAWARE else \
                max(0, int(min(remaining, self.card_wait) * 1000))
            hresult, states = self._call(
                "SCardGetStatusChange",
                lambda wait_ms=wait_ms, state=state: scard.SCardGetStatusChange(
                    context, wait_ms, [(reader, state)]),
                wait_ms / 1000 + self.connect_timeout)
            if hresult == scard.SCARD_E_TIMEOUT:
                raise CardAbsent(f"{reader}: no card within {self.card_wait:.1f} s")
            self._check(hresult, "reading the reader's state")
            _, event_state, _ = states[0]
            if event_state & scard.SCARD_STATE_PRESENT and \
                    not event_state & scard.SCARD_STATE_MUTE:
                return
            if remaining <= 0 or self.card_wait <= 0:
                raise CardAbsent(f"{reader}: no card")
            state = event_state & ~scard.SCARD_STATE_CHANGED

    def _atr(self) -> bytes:
        card = self._card
        assert card is not None
        hresult, _reader, _state, _protocol, atr = self._call(
            "SCardStatus", lambda: scard.SCardStatus(card), self.connect_timeout)
        self._check(hresult, "reading the card's status")
        return bytes(atr)

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            card = self._card
            if card is None:
                raise TransportFailure(f"{self.name}: not connected")
            protocol = self._protocol
            hresult, response = self._call(
                "SCardTransmit", lambda: scard.SCardTransmit(card, protocol, list(apdu)),
                self.timeout)
            if hresult == scard.SCARD_W_RESET_CARD:
                self._acknowledge_reset(card)
                raise CardReset(f"{self.name}: the card was reset by another application")
            if hresult in _ABSENT:
                self._card = None  # the handle is dead with the card
            self._check(hresult, "transmitting an APDU")
            return bytes(response)

    def _acknowledge_reset(self, card: int) -> None:
        hresult, protocol = self._call(
            "SCardReconnect",
            lambda: scard.SCardReconnect(card, self.share, _PROTOCOLS, scard.SCARD_LEAVE_CARD),
            self.connect_timeout)
        if hresult != scard.SCARD_S_SUCCESS:
            self._card = None
            self._check(hresult, "reconnecting after a reset")
        self._protocol = protocol

    def reset(self, warm: bool = True) -> bytes:
        with self._lock:
            card = self._card
            if card is None:
                raise TransportFailure(f"{self.name}: not connected")
            disposition = scard.SCARD_RESET_CARD if warm else scard.SCARD_UNPOWER_CARD
            hresult, protocol = self._call(
                "SCardReconnect",
                lambda: scard.SCardReconnect(card, self.share, _PROTOCOLS, disposition),
                self.timeout)
            self._check(hresult, "resetting the card")
            self._protocol = protocol
            return self._atr()

    def disconnect(self) -> None:
        with self._lock:
            card, self._card = self._card, None
            context, self._context = self._context, None
            try:
                if card is not None:
                    self._call("SCardDisconnect",
                               lambda: scard.SCardDisconnect(card, scard.SCARD_RESET_CARD),
                               self.connect_timeout)
                if context is not None:
                    self._call("SCardReleaseContext",
                               lambda: scard.SCardReleaseContext(context),
                               self.connect_timeout)
            except TransportFailure as exc:  # already forgotten: nothing more to do
                log.info("%s", exc)
            finally:
                if self._worker is not None:
                    self._worker.stop()
                    self._worker = None
