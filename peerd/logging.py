"""Logging set-up for the daemon: our lifecycle events readable, py-libp2p's routine noise muted.

py-libp2p 0.8.1 logs ordinary events (a failed dial, a closed circuit) at ERROR, so its logger
is raised to CRITICAL unless asked otherwise; peerd logs what matters as one line per event.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "INFO", libp2p_level: str | None = None) -> None:
    """Log to stderr at `level` (stdout is kept for what the user asked for: addresses).

    py-libp2p's own level comes from `libp2p_level`, else $PEERD_LIBP2P_LOG_LEVEL, else
    CRITICAL.
    """
    root = logging.getLogger()
    if not any(getattr(h, "_peerd", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._peerd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_libp2p(libp2p_level or os.environ.get("PEERD_LIBP2P_LOG_LEVEL", "CRITICAL"))


def quiet_libp2p(level: str = "CRITICAL") -> None:
    """Mute py-libp2p below `level`, unless LIBP2P_DEBUG asks for its own logging."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    import libp2p  # noqa: F401  (its import configures its loggers: let it happen first)

    for name in ("libp2p", "multiaddr", "async_service"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.propagate = True  # py-libp2p turns propagation off; use our handler
    # some modules pin their own level (the auto-connector logs routine dials at INFO)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("libp2p.") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.NOTSET)
