"""RACS wire vocabulary shared by the server and the client: codes, result lines, replies.

A request is `BEGIN [name]`, command lines, `END`, each line ending in LF (a CR before
the LF is ignored). A reply is `BEGIN name`, result lines, `END`. A result line is
`<+|-><class digit><command number, 2 digits> <line index, 3 digits> <text>`; the line
index counts the request's lines, BEGIN being 000. The server writes CR LF, as the
author's server does; readers accept LF alone too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum

VERSION = "0.2"
DEFAULT_PORT = 7777  # the de-facto RACS port of the author's server

# Longest request line the server reads, LF included. A short APDU with Le is 261 bytes
# (522 hex digits); 16 KiB leaves room for extended APDUs up to ~8 KB of data while
# keeping one connection's buffer small. Longer lines are dropped and answered -5yz.
MAX_LINE = 16 * 1024
MAX_NAME = 64  # request name, as in the author's server
MAX_INDEX = 999  # three digits of line index: a request holds at most 1000 lines


class Command(IntEnum):
    """The last two digits of a code: which command the line was."""

    NONE = 0  # no command could be recognised (line before BEGIN, unknown verb)
    BEGIN = 1
    GET_VERSION = 2
    SET_VERSION = 2
    LIST = 4
    RESET = 5
    APDU = 6
    SHUTDOWN = 7
    POWERON = 8
    ECHO = 9


VERBS: dict[str, Command] = {
    "BEGIN": Command.BEGIN,
    "GET-VERSION": Command.GET_VERSION,
    "SET-VERSION": Command.SET_VERSION,
    "LIST": Command.LIST,
    "RESET": Command.RESET,
    "APDU": Command.APDU,
    "SHUTDOWN": Command.SHUTDOWN,
    "POWERON": Command.POWERON,
    "ECHO": Command.ECHO,
}


class Outcome(IntEnum):
    """The first digit of a code: ok (with `+`) or the class of error (with `-`)."""

    OK = 0  # with '-': the command ran and failed (e.g. CONTINUE= status mismatch)
    UNKNOWN_COMMAND = 1
    NOT_IMPLEMENTED = 2
    ILLEGAL = 3
    BAD_PARAMETER = 4
    SYNTAX = 5
    UNAUTHORIZED = 6
    IN_USE = 7
    HARDWARE = 8
    SYSTEM = 9


_RESULT = re.compile(r"^([+-])(\d)(\d\d) (\d{3})(?: (.*))?$")


class ProtocolViolation(Exception):
    """The peer sent something that is not RACS."""


@dataclass(frozen=True, slots=True)
class ResultLine:
    ok: bool
    outcome: Outcome
    command: int
    index: int
    text: str = ""

    @property
    def code(self) -> int:
        return self.outcome * 100 + self.command

    def format(self) -> str:
        head = f"{'+' if self.ok else '-'}{self.code:03d} {self.index:03d}"
        return f"{head} {self.text}" if self.text else head

    @classmethod
    def parse(cls, line: str) -> ResultLine:
        match = _RESULT.match(line.rstrip("\r\n"))
        if match is None:
            raise ProtocolViolation(f"not a RACS result line: {line[:80]!r}")
        sign, outcome, command, index, text = match.groups()
        return cls(sign == "+", Outcome(int(outcome)), int(command), int(index), text or "")


@dataclass(slots=True)
class Reply:
    """One reply: its request name and its result lines (the last is the last command's)."""

    name: str
    results: list[ResultLine] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)

    @property
    def last(self) -> ResultLine:
        if not self.results:
            raise ProtocolViolation("reply without a result line")
        return self.results[-1]

    def format(self) -> str:
        head = f"BEGIN {self.name}" if self.name else "BEGIN"
        return "".join(f"{line}\r\n" for line in
                       [head, *(r.format() for r in self.results), "END"])

    @classmethod
    def parse(cls, lines: list[str]) -> Reply:
        """Parse `BEGIN name`, result lines, `END` (line ends already stripped or not)."""
        stripped = [line.rstrip("\r\n") for line in lines]
        if len(stripped) < 2 or stripped[-1] != "END" or not (
            stripped[0] == "BEGIN" or stripped[0].startswith("BEGIN ")
        ):
            raise ProtocolViolation(f"not a RACS reply: {stripped[:3]!r}")
        name = stripped[0][len("BEGIN "):].strip() if stripped[0] != "BEGIN" else ""
        return cls(name, [ResultLine.parse(line) for line in stripped[1:-1]])
