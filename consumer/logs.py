"""Logging for the node, configured in exactly one place: structlog over stdlib logging.

Owns the format (JSON lines when stderr is not a terminal, readable colours when it is)
and the context every line carries (node_id; rank in an engine rank; job_id while a job runs).
"""

from __future__ import annotations

import importlib
import logging
import sys

import structlog

from .broker import KAFKA_NOISE


def configure(node_id: str, level: str = "INFO") -> None:
    """Route stdlib and structlog records through one renderer, with `node_id` bound."""
    _route(level)
    structlog.contextvars.bind_contextvars(node_id=node_id)


def configure_rank(node_id: str, rank: int, level: str = "INFO") -> None:
    """The same setup in an engine rank, with `node_id` and `rank` bound: a spawned rank
    inherits nothing of its parent's logging, and its errors must not reach stderr bare."""
    _route(level)
    _adopt_model_libraries()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(node_id=node_id, rank=rank)


def _adopt_model_libraries() -> None:
    """diffusers and transformers write to stderr through handlers of their own, with
    progress bars: send their records through ours (so they carry node and rank) and drop
    the bars (a rank's progress travels to the node as JobProgress)."""
    for name in ("diffusers", "transformers"):
        try:
            library = importlib.import_module(f"{name}.utils.logging")
        except ImportError:  # not a worker install: nothing of theirs to adopt
            continue
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()


def _route(level: str) -> None:
    """One handler on the root logger with structlog on top: every record, ours or a
    library's, renders the same way and carries the bound context."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.ExtraAdder(),  # fields passed as `extra=` (e.g. kafka_outage)
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(KAFKA_NOISE)  # one line per outage, not hundreds per second
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Third-party warnings (torch, diffusers) through the same renderer, with the context.
    logging.captureWarnings(True)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
