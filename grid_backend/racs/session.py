"""The RACS grammar and one session's state machine, without any network I/O.

The server hands each received line to `RacsSession.handle_line` and writes back the
bytes of the `Step` it gets (if any); it closes the connection when the step says so.
Elements are reached through an `ElementHub`, which owns threads and deadlines. The
behaviour follows the author's server (github purien/racs_0_1, DESIGN.md section 5):

- Only the last command's result is returned, plus those of lines ending in APPEND.
- On an error the reply becomes BEGIN / the error line / END, sent at once; the
  remaining lines of that request are dropped up to its END.
- A line before BEGIN, a second BEGIN, or an unknown verb: error reply, session ends.

Where the author's server and the code table disagree, the code table wins (documented in
docs/racs.md): unknown verb -100 (author: -900); APDU refused by policy -606 (author:
-706); APDU or RESET on an element this session has not powered on -306/-305 (author:
-706/-705). Blank lines are ignored (the author's server ends the session), so a person
at `openssl s_client` may press Enter safely.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from grid_backend.apdu import CardAbsent, TransportFailure
from grid_backend.racs.authorization import Authorizer
from grid_backend.racs.elements import (
    ElementHub,
    ElementInUse,
    ElementNotPowered,
    ElementStuck,
    ElementUnknown,
)
from grid_backend.racs.protocol import (
    MAX_INDEX,
    MAX_LINE,
    MAX_NAME,
    VERBS,
    VERSION,
    Command,
    Outcome,
    Reply,
    ResultLine,
)
from grid_backend.secure_element import ElementError

log = logging.getLogger("p11grid.racs.session")
T = TypeVar("T")

MAX_REPLY = 1024 * 1024  # bytes of APPENDed results one reply may carry
MAX_RESPONSE = 65536 + 2  # bytes of one APDU response after GET RESPONSE chaining
MAX_CHAINED = 256  # GET RESPONSE rounds for one APDU

_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e\t]")
_HEX = re.compile(r"[0-9A-Fa-f]*")
GET_RESPONSE = bytes.fromhex("00C00000")


@dataclass(frozen=True, slots=True)
class Step:
    """What the server does after one line: send `reply` (if any), then maybe hang up."""

    reply: bytes | None = None
    end_session: bool = False


class CommandFailed(Exception):
    """One command's failure: becomes the request's single error line."""

    def __init__(self, outcome: Outcome, text: str, end_session: bool = False):
        super().__init__(text)
        self.outcome, self.text, self.end_session = outcome, text, end_session


def _hex(text: str, what: str, length: int | None = None) -> bytes:
    if len(text) % 2 or not _HEX.fullmatch(text) or (length is not None and
                                                     len(text) != 2 * length):
        size = f"{length} bytes of " if length is not None else ""
        raise CommandFailed(Outcome.BAD_PARAMETER, f"{what} is not {size}hex: {text[:32]}")
    return bytes.fromhex(text)


@dataclass(frozen=True, slots=True)
class ApduRequest:
    seid: str
    apdu: bytes
    expect: bytes | None = None  # CONTINUE=SW1SW2
    more: int | None = None  # MORE=SW1
    fetch: bytes = GET_RESPONSE  # FETCH=CLAINSP1P2

    @classmethod
    def parse(cls, args: list[str]) -> ApduRequest:
        if len(args) < 2:
            raise CommandFailed(Outcome.SYNTAX, "APDU needs a SEID and a hex APDU")
        apdu = _hex(args[1], "APDU")
        if len(apdu) < 4:
            raise CommandFailed(Outcome.BAD_PARAMETER, "an APDU has at least 4 bytes")
        expect: bytes | None = None
        more: int | None = None
        fetch = GET_RESPONSE
        for option in args[2:]:
            key, sep, value = option.partition("=")
            if key == "CONTINUE" and sep:
                expect = _hex(value, "CONTINUE", 2)
            elif key == "MORE" and sep:
                more = _hex(value, "MORE", 1)[0]
            elif key == "FETCH" and sep:
                fetch = _hex(value, "FETCH", 4)
            else:
                raise CommandFailed(Outcome.SYNTAX, f"unknown APDU option {option[:32]}")
        return cls(args[0], apdu, expect, more, fetch)


def selected_aid(apdu: bytes) -> bytes | None:
    """The AID of a SELECT by AID (INS A4, P1 04), b"" if malformed; None if no SELECT."""
    if apdu[1] != 0xA4 or apdu[2] != 0x04:
        return None
    if len(apdu) >= 7 and apdu[4] == 0:  # extended length
        length = int.from_bytes(apdu[5:7], "big")
        body = apdu[7:7 + length]
    elif len(apdu) >= 5:
        length = apdu[4]
        body = apdu[5:5 + length]
    else:
        return b""
    return body if len(body) == length else b""


class RacsSession:
    """One TLS connection's RACS session, for the client certificate's CN."""

    def __init__(self, cn: str, authorizer: Authorizer, hub: ElementHub):
        self.cn, self.authorizer, self.hub = cn, authorizer, hub
        self.in_request = False
        self.dropping = False  # after an error: drop lines up to END
        self.name = ""
        self.index = 0
        self.results: list[ResultLine] = []
        self.keep_last = False  # the last result's line ended in APPEND
        self.reply_size = 0
        self.selected: set[str] = set()  # elements where an allowed SELECT was done

    # -- lines -------------------------------------------------------------------------

    async def handle_line(self, raw: bytes) -> Step:
        line = raw.removesuffix(b"\n").removesuffix(b"\r")
        if _NOT_PRINTABLE.search(line):
            return self._bad_line(Outcome.SYNTAX, "line is not printable ASCII")
        tokens = line.decode("ascii").split()
        if not tokens:
            return Step()
        verb = tokens[0]
        if self.dropping:
            if verb == "END":
                self.dropping = False
            return Step()
        if not self.in_request:
            if verb != "BEGIN":
                return self._end(Outcome.ILLEGAL, Command.NONE,
                                 f"waiting for BEGIN, got {verb[:32]}")
            return self._begin(tokens[1:])
        self.index += 1
        if self.index > MAX_INDEX:
            return self._fail(Outcome.ILLEGAL, Command.NONE,
                              f"a request holds at most {MAX_INDEX + 1} lines")
        if verb == "END":
            reply = Reply(self.name, self.results).format().encode("ascii")
            self._forget_request()
            return Step(reply)
        if verb == "BEGIN":
            return self._end(Outcome.ILLEGAL, Command.BEGIN, "duplicate BEGIN")
        command = VERBS.get(verb)
        if command is None:
            return self._end(Outcome.UNKNOWN_COMMAND, Command.NONE,
                             f"unknown command {verb[:32]}")
        keep = len(tokens) > 1 and tokens[-1] == "APPEND"
        args = tokens[1:-1] if keep else tokens[1:]
        try:
            text = await self._run(verb, command, args)
        except CommandFailed as failure:
            if failure.end_session:
                return self._end(failure.outcome, command, failure.text)
            return self._fail(failure.outcome, command, failure.text)
        return self._record(ResultLine(True, Outcome.OK, command, self.index, text), keep)

    def oversize_line(self) -> Step:
        """The server dropped a line longer than MAX_LINE bytes."""
        return self._bad_line(Outcome.SYNTAX, f"line longer than {MAX_LINE} bytes")

    async def close(self) -> int:
        """Session end: power off every element this session holds."""
        self.selected.clear()
        return await self.hub.release_all(self)

    # -- request bookkeeping -----------------------------------------------------------

    def _bad_line(self, outcome: Outcome, text: str) -> Step:
        if self.dropping:
            return Step()
        if not self.in_request:
            return self._end(Outcome.ILLEGAL, Command.NONE, f"waiting for BEGIN: {text}")
        self.index += 1
        return self._fail(outcome, Command.NONE, text)

    def _begin(self, args: list[str]) -> Step:
        self.in_request, self.index, self.name = True, 0, ""
        if len(args) > 1:
            return self._fail(Outcome.SYNTAX, Command.BEGIN, "BEGIN takes one name")
        if args and len(args[0]) > MAX_NAME:
            return self._fail(Outcome.BAD_PARAMETER, Command.BEGIN,
                              f"request name longer than {MAX_NAME}")
        self.name = args[0] if args else ""
        return self._record(ResultLine(True, Outcome.OK, Command.BEGIN, 0, "ok"), False)

    def _record(self, result: ResultLine, keep: bool) -> Step:
        if self.results and not self.keep_last:
            dropped = self.results.pop()
            self.reply_size -= len(dropped.text) + 10
        self.reply_size += len(result.text) + 10
        if self.reply_size > MAX_REPLY:
            return self._fail(Outcome.SYSTEM, result.command,
                              f"reply longer than {MAX_REPLY} bytes")
        self.results.append(result)
        self.keep_last = keep
        return Step()

    def _error_reply(self, outcome: Outcome, command: int, text: str) -> bytes:
        line = ResultLine(False, outcome, command, min(self.index, MAX_INDEX), text)
        return Reply(self.name, [line]).format().encode("ascii")

    def _fail(self, outcome: Outcome, command: int, text: str) -> Step:
        reply = self._error_reply(outcome, command, text)
        self._forget_request()
        self.dropping = True
        return Step(reply)

    def _end(self, outcome: Outcome, command: int, text: str) -> Step:
        reply = self._error_reply(outcome, command, text)
        self._forget_request()
        return Step(reply, end_session=True)

    def _forget_request(self) -> None:
        self.in_request, self.name, self.index = False, "", 0
        self.results, self.keep_last, self.reply_size = [], False, 0

    # -- commands ----------------------------------------------------------------------

    async def _run(self, verb: str, command: Command, args: list[str]) -> str:
        match command:
            case Command.LIST:
                return " ".join(seid for seid in self.hub.seids()
                                if self.authorizer.may_use(self.cn, seid))
            case Command.ECHO:
                if not args:
                    raise CommandFailed(Outcome.SYNTAX, "ECHO needs a value")
                return " ".join(args)
            case Command.POWERON:
                seid = self._seid(args, "POWERON")
                atr, _held = await self._call(self.hub.power_on(seid, self))
                if not _held:
                    self.selected.discard(seid)
                return atr.hex().upper()
            case Command.SHUTDOWN:
                seid = self._seid(args, "SHUTDOWN")
                self.selected.discard(seid)
                await self._call(self.hub.shut_down(seid, self))
                return f"{seid} powered off"
            case Command.RESET:
                seid = self._seid(args, "RESET")
                if len(args) > 2 or (len(args) == 2 and args[1] != "WARM"):
                    raise CommandFailed(Outcome.SYNTAX, "RESET <SEID> [WARM]")
                self.selected.discard(seid)  # a reset card has nothing selected
                atr = await self._call(self.hub.reset(seid, self, warm=len(args) == 2))
                return atr.hex().upper()
            case Command.APDU:
                return await self._apdu(ApduRequest.parse(args))
        # GET-VERSION and SET-VERSION share their number (02).
        if verb == "SET-VERSION":
            if not args:
                raise CommandFailed(Outcome.SYNTAX, "SET-VERSION needs a version")
            if args[0] != VERSION:
                raise CommandFailed(Outcome.BAD_PARAMETER,
                                    f"version {args[0][:16]} is not supported")
        return VERSION

    def _seid(self, args: list[str], verb: str) -> str:
        if not args:
            raise CommandFailed(Outcome.SYNTAX, f"{verb} needs a SEID")
        seid = args[0]
        # Authorization before existence: a CN learns nothing of elements it may not use.
        if not self.authorizer.may_use(self.cn, seid):
            raise CommandFailed(Outcome.UNAUTHORIZED, f"SEID {seid[:64]} is not yours")
        if seid not in self.hub.elements:
            raise CommandFailed(Outcome.BAD_PARAMETER, f"unknown SEID {seid[:64]}")
        return seid

    async def _call(self, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except ElementUnknown as exc:
            raise CommandFailed(Outcome.BAD_PARAMETER, f"unknown SEID {exc}") from None
        except ElementInUse as exc:
            raise CommandFailed(Outcome.IN_USE, f"SEID {exc} is in use by another session, "
                                "SHUTDOWN is required") from None
        except ElementNotPowered as exc:
            raise CommandFailed(Outcome.ILLEGAL, f"SEID {exc} is powered off, "
                                "POWERON is required") from None
        except (ElementStuck, CardAbsent, TransportFailure, ElementError) as exc:
            raise CommandFailed(Outcome.HARDWARE, _one_line(str(exc))) from None
        except NotImplementedError:
            raise CommandFailed(Outcome.NOT_IMPLEMENTED,
                                "the element does not do this") from None
        except Exception:
            log.exception("RACS: element call failed for CN %s", self.cn)
            raise CommandFailed(Outcome.SYSTEM, "system error") from None

    async def _apdu(self, request: ApduRequest) -> str:
        seid = self._seid([request.seid], "APDU")
        await self._call(_checked(self.hub, seid, self))
        header = request.apdu[:4]
        aid = selected_aid(request.apdu)
        if aid is not None:
            if not aid:
                raise CommandFailed(Outcome.BAD_PARAMETER, "SELECT without a well-formed AID")
            if not (self.authorizer.aid_allowed(self.cn, seid, aid)
                    and self.authorizer.apdu_allowed(self.cn, seid, header)):
                raise CommandFailed(Outcome.UNAUTHORIZED,
                                    f"SELECT of AID {aid.hex().upper()} refused")
            self.selected.add(seid)
        elif seid not in self.selected:
            raise CommandFailed(Outcome.UNAUTHORIZED,
                                f"SEID {seid}: no application selected")
        elif not self.authorizer.apdu_allowed(self.cn, seid, header):
            raise CommandFailed(Outcome.UNAUTHORIZED,
                                f"APDU {header.hex().upper()} refused by filter")
        response = await self._exchange(seid, request)
        if request.expect is not None and response[-2:] != request.expect:
            # -006: the command ran, the card answered otherwise than CONTINUE= asked.
            raise CommandFailed(Outcome.OK, response.hex().upper())
        return response.hex().upper()

    async def _exchange(self, seid: str, request: ApduRequest) -> bytes:
        apdu = request.apdu
        response = await self._transmit(seid, apdu)
        if len(apdu) == 5 and len(response) == 2 and response[0] == 0x6C and response[1]:
            # Wrong Le: the card says which; ask again, as the author's server does.
            response = await self._transmit(seid, apdu[:4] + response[1:])
        if request.more is None:
            return response
        data = bytearray()
        for _ in range(MAX_CHAINED):
            if response[-2] != request.more:
                return bytes(data) + response
            data += response[:-2]
            if len(data) > MAX_RESPONSE:
                break
            response = await self._transmit(seid, request.fetch + response[-1:])
        raise CommandFailed(Outcome.HARDWARE, "response too long")

    async def _transmit(self, seid: str, apdu: bytes) -> bytes:
        response = await self._call(self.hub.transmit(seid, self, apdu))
        if len(response) < 2:
            raise CommandFailed(Outcome.HARDWARE, "response without a status word")
        return response


async def _checked(hub: ElementHub, seid: str, owner: object) -> None:
    hub.check_held(seid, owner)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200] or "hardware error"
