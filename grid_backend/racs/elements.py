"""The secure elements a RACS server exposes: SEID -> ApduTransport, with locks and deadlines.

Transports block (PC/SC, a remote card), so every call runs in a thread of its own and
is awaited with a deadline. A daemon thread per call rather than a pool: a card that
never answers strands its thread, and a stranded pool worker would keep the process
from exiting; a stranded daemon thread does not. While that thread is still stuck the
element refuses further calls at once instead of queueing behind it.

POWERON locks an element to one session (`owner`) until SHUTDOWN or the session's end.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from grid_backend.apdu import ApduTransport

T = TypeVar("T")


class ElementUnknown(Exception):
    """No element has this SEID."""


class ElementInUse(Exception):
    """Another session holds the element."""


class ElementNotPowered(Exception):
    """The element must be powered on (POWERON) by this session first."""


class ElementStuck(Exception):
    """The element did not answer within its deadline, or is still busy with a call that
    did not."""


@dataclass(slots=True)
class Element:
    seid: str
    transport: ApduTransport
    owner: object | None = None  # the session holding it (POWERON) or None
    atr: bytes = b""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    straggler: threading.Thread | None = None  # a call thread that outlived its deadline


async def _in_thread(element: Element, call: Callable[[], T], deadline: float) -> T:
    if element.straggler is not None:
        if element.straggler.is_alive():
            raise ElementStuck(f"element {element.seid} is still busy with a call that "
                               "did not finish within its deadline")
        element.straggler = None
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = call(), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed while the card was busy
            pass

    thread = threading.Thread(target=run, name=f"racs-{element.seid}", daemon=True)
    thread.start()
    try:
        async with asyncio.timeout(deadline):
            return await future
    except TimeoutError:
        element.straggler = thread
        raise ElementStuck(
            f"element {element.seid} did not answer within {deadline:g} s") from None


class ElementHub:
    """The elements of one RACS server and who holds each."""

    def __init__(self, transports: Mapping[str, ApduTransport], deadline: float = 30.0):
        self.elements = {seid: Element(seid, transport) for seid, transport in transports.items()}
        self.deadline = deadline

    def seids(self) -> list[str]:
        return sorted(self.elements)

    def _element(self, seid: str) -> Element:
        try:
            return self.elements[seid]
        except KeyError:
            raise ElementUnknown(seid) from None

    def _held(self, seid: str, owner: object) -> Element:
        element = self._element(seid)
        if element.owner is not None and element.owner is not owner:
            raise ElementInUse(seid)
        if element.owner is None:
            raise ElementNotPowered(seid)
        return element

    async def power_on(self, seid: str, owner: object) -> tuple[bytes, bool]:
        """Power on and lock; returns (ATR, whether this owner already held it)."""
        element = self._element(seid)
        async with element.lock:
            if element.owner is owner:
                return element.atr, True
            if element.owner is not None:
                raise ElementInUse(seid)
            atr = await _in_thread(element, element.transport.connect, self.deadline)
            element.owner, element.atr = owner, atr
            return atr, False

    async def shut_down(self, seid: str, owner: object) -> None:
        """Power off and unlock (nothing to do when nobody holds it)."""
        element = self._element(seid)
        async with element.lock:
            if element.owner is None:
                return
            if element.owner is not owner:
                raise ElementInUse(seid)
            element.owner, element.atr = None, b""  # unlocked even if the card fails
            await _in_thread(element, element.transport.disconnect, self.deadline)

    async def reset(self, seid: str, owner: object, warm: bool) -> bytes:
        element = self._held(seid, owner)
        async with element.lock:
            element.atr = await _in_thread(
                element, lambda: element.transport.reset(warm), self.deadline)
            return element.atr

    def check_held(self, seid: str, owner: object) -> None:
        """Raise unless this owner holds the (powered) element."""
        self._held(seid, owner)

    async def transmit(self, seid: str, owner: object, apdu: bytes) -> bytes:
        element = self._held(seid, owner)
        async with element.lock:
            return await _in_thread(
                element, lambda: element.transport.transmit(apdu), self.deadline)

    async def release_all(self, owner: object) -> int:
        """Power off every element this owner holds (session end); returns how many."""
        released = 0
        for element in self.elements.values():
            if element.owner is owner:
                released += 1
                try:
                    await self.shut_down(element.seid, owner)
                except Exception:  # the lock is released regardless
                    pass
        return released
