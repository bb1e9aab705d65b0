"""Logging helpers: module loggers and a timed-task context manager."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

logging.getLogger("screpair").addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """Return the logger for a screpair module (``name`` is usually ``__name__``)."""
    return logging.getLogger(name)


@contextlib.contextmanager
def log_task(what: str, logger: logging.Logger | None = None) -> Iterator[None]:
    """Log ``what …`` on entry and ``what … done (1.2 s)`` on exit."""
    log = logger or logging.getLogger("screpair")
    log.info("%s …", what)
    start = time.perf_counter()
    yield
    log.info("%s … done (%.1f s)", what, time.perf_counter() - start)


def configure_cli_logging(verbosity: int) -> None:
    """Attach a stderr handler to the ``screpair`` logger (used by the CLI only).

    ``verbosity`` < 0 shows errors only, 0 warnings and info, > 0 debug.
    """
    level = logging.ERROR if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    log = logging.getLogger("screpair")
    log.setLevel(level)
    for h in [h for h in log.handlers if getattr(h, "_screpair_cli", False)]:
        log.removeHandler(h)  # replace: sys.stderr may have changed since the last call
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("screpair: %(message)s"))
    handler._screpair_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
