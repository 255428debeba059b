"""The registry on PostgreSQL (psycopg 3), shared by several grid nodes.

The location is a libpq URL, `postgresql://USER@HOST:PORT/DBNAME?PARAMS`. The password
comes from where libpq looks (PGPASSWORD, PGPASSFILE, ~/.pgpass) or from our own
`password_file=PATH` parameter (a file holding only the password); one written in the URL
works but is discouraged. One more parameter of ours: `statement_timeout` (ms, default
5000). libpq's `connect_timeout` defaults to 5 s here; every other parameter goes to libpq
as written.

Threads share one connection behind a lock. The service asks the registry little (an
element when first used, bindings cached for 2 s per caller, a few rows per authorize),
so a pool would only add connections and a thread; the audit writer, the one steady
writer, opens its own registry. A dropped connection is noticed at the next request,
which reopens it (and runs once more if the old one had died while idle).

Deadlines: connect_timeout bounds connecting; statement_timeout bounds a request the
server is slow to run; a watchdog shuts the socket of any request that has not ended
statement_timeout + 2 s after it began (a network that stalls, a server that stops
answering); and a thread waits for the shared connection no longer than that either, so
no call waits without a deadline, whatever the fault.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors

from grid_backend.registry import display
from grid_backend.registry.core import Database, RegistryError, SqlRegistry, T, Transaction

SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT = 5  # s, unless the URL says otherwise
STATEMENT_TIMEOUT_MS = 5000
GRACE = 2.0  # s the watchdog adds to statement_timeout before it cuts the connection
OUR_PARAMETERS = ("password_file", "statement_timeout")


@dataclass(frozen=True)
class Target:
    """A parsed location: what libpq gets, and what may be shown."""

    conninfo: str
    options: dict[str, Any]  # keyword parameters for psycopg.connect
    display: str  # the URL without its password
    secret: str | None  # the password, if we know it: scrubbed from every message
    statement_timeout_ms: int


def _parameter(item: str) -> tuple[str, str]:
    """One `name=value` of a URL's query, decoded as libpq does (%XX only: a `+` stays a
    `+`, unlike in an HTML form's query)."""
    name, _, value = item.partition("=")
    return urllib.parse.unquote(name), urllib.parse.unquote(value)


def parse_location(location: str) -> Target:
    parts = urllib.parse.urlsplit(location)
    if parts.scheme not in SCHEMES:
        raise RegistryError("a registry URL starts with postgresql://")
    items = [item for item in parts.query.split("&") if item]
    query = [_parameter(item) for item in items]
    ours = {name: value for name, value in query if name in OUR_PARAMETERS}
    # libpq's parameters go to it as written: decoded and encoded again they could change.
    theirs = "&".join(item for item, (name, _) in zip(items, query, strict=True)
                      if name not in OUR_PARAMETERS)
    shown = display(location)
    secret = urllib.parse.unquote(parts.password) if parts.password else \
        next((value for name, value in query if name == "password"), None)
    options: dict[str, Any] = {}
    if "password_file" in ours:
        path = Path(ours["password_file"])
        try:
            secret = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise RegistryError(f"registry {shown}: cannot read its password_file {path}: "
                                f"{exc.strerror}") from None
        options["password"] = secret
    try:
        timeout_ms = int(ours.get("statement_timeout", STATEMENT_TIMEOUT_MS))
        if timeout_ms <= 0:
            raise ValueError
    except ValueError:
        raise RegistryError(f"registry {shown}: statement_timeout must be a positive number "
                            "of milliseconds") from None
    conninfo = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, theirs, ""))
    try:
        given = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise RegistryError(f"registry {shown}: not a valid libpq URL: "
                            f"{_scrub(str(exc), secret)}") from None
    # Keyword parameters replace the URL's: only defaults for what it does not say.
    for name, default in (("connect_timeout", CONNECT_TIMEOUT), ("application_name", "p11grid")):
        if name not in given:
            options[name] = default
    # Add to the URL's options rather than lose them.
    options["options"] = f"{given.get('options', '')} -c statement_timeout={timeout_ms}".strip()
    return Target(conninfo, options, shown, secret, timeout_ms)


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


@lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class _Cursor:
    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def run(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(_placeholders(sql), tuple(parameters))
        return list(self._cursor.fetchall()) if self._cursor.description else []

    def count(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        self._cursor.execute(_placeholders(sql), tuple(parameters))
        return int(self._cursor.rowcount)

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cursor.executemany(_placeholders(sql), [tuple(row) for row in rows])


class _Watchdog:
    """Shuts the connection's socket if a request outlives its deadline: the blocked
    call then fails at once instead of waiting on a silent server."""

    def __init__(self, connection: psycopg.Connection[Any], seconds: float) -> None:
        self._fd = connection.pgconn.socket
        self._lock = threading.Lock()
        self._done = False
        self.fired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:  # after this, _expire cannot touch a descriptor reused later
            self._done = True
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            try:
                with socket.socket(fileno=os.dup(self._fd)) as duplicate:
                    duplicate.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone: the request fails by itself


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, location: str) -> None:
        self._target = parse_location(location)
        self.display = self._target.display
        self._deadline = self._target.statement_timeout_ms / 1000 + GRACE
        self._lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None
        self._open()  # a wrong URL or password shows now, not at the first caller

    def _open(self) -> psycopg.Connection[Any]:
        try:
            self._connection = psycopg.connect(self._target.conninfo, autocommit=True,
                                               **self._target.options)
        except psycopg.Error as exc:
            hint = ""
            if "no password supplied" in str(exc):
                hint = (" (give the password in a password_file=PATH parameter, or in "
                        "~/.pgpass or $PGPASSFILE)")
            raise RegistryError(f"cannot connect to the registry {self.display}: "
                                f"{self._explain(exc)}{hint}") from None
        return self._connection

    def _discard(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except psycopg.Error:
                pass
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _explain(self, exc: psycopg.Error) -> str:
        text = " ".join(str(exc).split())  # libpq's messages span lines
        return _scrub(text, self._target.secret)

    def transaction(self, work: Callable[[Transaction], T], write: bool = True) -> T:
        # Waiting for the shared connection has a deadline too: else each thread queued
        # behind a stalled database would wait out every request (and reconnection)
        # ahead of it.
        if not self._lock.acquire(timeout=self._deadline):
            raise RegistryError(f"the registry {self.display} is busy: another request has "
                                f"held its connection for over {self._deadline:g} s (the "
                                "database or the network to it is slow or stalled)")
        try:
            return self._attempts(work, write)
        finally:
            self._lock.release()

    def _attempts(self, work: Callable[[Transaction], T], write: bool) -> T:
        for attempt in (1, 2):
            reused = self._connection is not None
            connection = self._connection or self._open()
            watchdog: _Watchdog | None = None
            committing = False
            try:
                watchdog = _Watchdog(connection, self._deadline)
                with watchdog, connection.cursor() as cursor:
                    if not write:
                        return work(_Cursor(cursor))
                    with connection.transaction():
                        result = work(_Cursor(cursor))
                        committing = True  # a failure now may come after the server committed
                    return result
            except psycopg.Error as exc:
                cut = watchdog is not None and watchdog.fired
                lost = cut or connection.broken or connection.closed
                if lost:
                    self._discard()
                if lost and reused and not cut and not committing and attempt == 1:
                    # It died while idle (a server restart), and nothing of this request
                    # was committed: once more, on a new connection.
                    continue
                unknown = "; whether its change was committed is unknown" if committing else ""
                raise RegistryError(self._failure(exc, cut) + unknown) from None
        raise AssertionError("unreachable")

    def migrate(self, work: Callable[[Transaction], T]) -> T:
        return self.transaction(work, write=True)

    def _failure(self, exc: psycopg.Error, cut: bool) -> str:
        if cut:
            return (f"the registry {self.display} did not answer within {self._deadline:g} s"
                    " (the database or the network to it stalled); the connection was "
                    "closed and is reopened at the next request")
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return (f"the registry {self.display} did not finish a request within its "
                    f"statement_timeout ({self._target.statement_timeout_ms} ms): "
                    f"{self._explain(exc)}")
        if isinstance(exc, psycopg.IntegrityError):
            return f"registry {self.display}: {self._explain(exc)}"
        return f"registry {self.display}: {type(exc).__name__}: {self._explain(exc)}"


class PostgresRegistry(SqlRegistry):
    """The registry in the PostgreSQL database at `location` (a postgresql:// URL); its
    schema must be current (`p11grid db upgrade`)."""

    def __init__(self, location: str, node: str = "") -> None:
        super().__init__(PostgresDatabase(location), location, node)
