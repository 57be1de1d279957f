"""`i2v worker`: build the node from its settings and run its supervisor until told to stop.

Owns process-edge wiring: settings, logging, signals (the first SIGTERM/SIGINT stops
claiming and gives the running job SHUTDOWN_GRACE to finish before it is handed back to the
queue; a second one exits at once and leaves the job to its lease), and shutdown order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from .engine_host import EngineConfig, EngineHost
from .fetch import FetchPolicy
from .settings import WorkerSettings
from .storage import ResultStore, StoreConfig
from .supervisor import Supervisor

log = logging.getLogger(__name__)


def build(settings: WorkerSettings) -> Supervisor:
    """The supervisor of one lane, with its engine, store and fetch policy."""
    s = settings
    store = ResultStore(
        StoreConfig(
            endpoint=s.minio_endpoint,
            access_key=s.minio_access_key,
            secret_key=s.minio_secret_key.get_secret_value(),
            bucket=s.minio_bucket,
            secure=s.minio_secure,
            region=s.minio_region,
            presign_expiry_s=s.presign_expiry_s,
            retention_days=s.output_retention_days,
            max_image_bytes=s.max_image_bytes,
        )
    )
    policy = FetchPolicy.from_env_value(
        s.allowed_hosts, max_bytes=s.max_image_bytes, deadline_s=s.fetch_timeout_s
    )
    engine = EngineHost(
        EngineConfig(model_dir=str(s.model_ckpt_dir), device=s.device, t5_cpu=s.t5_cpu),
        start_timeout_s=s.engine_start_timeout,
        stall_timeout_s=s.engine_stall_timeout,
    )
    return Supervisor(s, engine, store, policy)


async def serve(settings: WorkerSettings) -> None:
    """Run until SIGTERM/SIGINT: the first stops claiming, a second exits immediately."""
    supervisor = build(settings)
    loop = asyncio.get_running_loop()
    signals = {"count": 0}

    def on_signal(signum: int) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("second signal: exiting now")
            os._exit(130)
        log.info(
            "signal %s: no more claims; a running job has %.0f s (SHUTDOWN_GRACE) to finish, "
            "then it is handed back; a second signal exits now",
            signum,
            settings.shutdown_grace,
        )
        supervisor.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await supervisor.run()
