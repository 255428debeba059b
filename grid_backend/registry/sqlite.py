"""The registry in one SQLite file: the embedded default.

Safe for the service's threads (one connection behind a lock) and for the CLI writing
while the service reads (WAL journal). A brand-new file is created at the current schema
version; an older one needs `p11grid db upgrade`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grid_backend.registry.core import Database, RegistryError, SqlRegistry, T, Transaction

BUSY_TIMEOUT = 10.0  # s a writer waits for another process's write to end


class _Cursor:
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    def run(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._cursor.execute(sql, tuple(parameters)).fetchall())

    def count(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        return int(self._cursor.execute(sql, tuple(parameters)).rowcount)

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cursor.executemany(sql, [tuple(row) for row in rows])


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = path
        self.display = str(path)
        if not create and not path.exists():
            raise RegistryError(f"there is no registry {path}")
        self._lock = threading.Lock()
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), not the
            # module's implicit ones, which leave DDL outside any transaction.
            self._db = sqlite3.connect(str(path), check_same_thread=False,
                                       timeout=BUSY_TIMEOUT, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, work: Callable[[Transaction], T], begin: str | None) -> T:
        cursor = self._db.cursor()
        try:
            if begin:
                cursor.execute(begin)
            result = work(_Cursor(cursor))
            if begin:
                cursor.execute("COMMIT")
            return result
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise RegistryError(f"registry {self.display}: {exc}") from exc
            raise
        finally:
            cursor.close()

    def transaction(self, work: Callable[[Transaction], T], write: bool = True) -> T:
        with self._lock:
            # IMMEDIATE: take the write lock before the first read, so a read-then-write
            # never fails halfway with SQLITE_BUSY when another process wrote meanwhile.
            return self._run(work, "BEGIN IMMEDIATE" if write else None)

    def migrate(self, work: Callable[[Transaction], T]) -> T:
        with self._lock:
            # Table rebuilds need foreign keys off, and that pragma is a no-op inside a
            # transaction; the migration checks them itself before committing.
            self._db.execute("PRAGMA foreign_keys=OFF")
            try:
                return self._run(work, "BEGIN IMMEDIATE")
            finally:
                self._db.execute("PRAGMA foreign_keys=ON")


class SqliteRegistry(SqlRegistry):
    """The registry in the SQLite file `path` (created, at the current schema, if new)."""

    def __init__(self, path: Path | str, node: str = "") -> None:
        self.path = Path(path)
        super().__init__(SqliteDatabase(self.path), str(self.path), node, create_if_empty=True)
