"""Structured logging: configure once per process, bind who we are, log dotted events with fields."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

import structlog


def configure_logging(*, role: str, rank: int = 0, json_lines: bool = False, level: int = logging.INFO) -> None:
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json_lines else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),  # stdout is reserved for the summary
        cache_logger_on_first_use=False,
    )
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role, rank=rank)
