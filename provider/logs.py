"""Where the module's log lines go: a file, else syslog, else stderr. Never stdout.

The logger does not propagate: a Python host's own logging setup (which may print to
stdout) must not receive our lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOGGER_NAME = "p11grid"
FORMAT = "%(asctime)s p11grid[%(process)d] %(levelname)s %(name)s: %(message)s"
_handler: logging.Handler | None = None


def _syslog_or_stderr() -> logging.Handler:
    if os.path.exists("/dev/log"):
        try:
            handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
            handler.setFormatter(logging.Formatter("p11grid[%(process)d]: %(levelname)s "
                                                   "%(name)s: %(message)s"))
            return handler
        except OSError:
            pass
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def configure(log_file: str | None, level: str) -> None:
    """(Re)direct the module's log; a file that cannot be opened falls back to syslog."""
    global _handler
    logger = logging.getLogger(LOGGER_NAME)
    logger.propagate = False
    new: logging.Handler
    fallback_reason = None
    if log_file:
        try:
            new = logging.FileHandler(log_file, encoding="utf-8")
            new.setFormatter(logging.Formatter(FORMAT))
        except OSError as exc:
            fallback_reason = f"cannot open log_file {log_file}: {exc.strerror}"
            new = _syslog_or_stderr()
    else:
        new = _syslog_or_stderr()
    if _handler is not None:
        logger.removeHandler(_handler)
        _handler.close()
    _handler = new
    logger.addHandler(new)
    logger.setLevel(level.upper())
    if fallback_reason:
        logger.warning("%s; logging here instead", fallback_reason)


def ensure_default() -> None:
    """Before any config is read, errors still need a place to go."""
    if _handler is None:
        configure(None, "info")
