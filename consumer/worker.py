"""`i2v worker`: build the node from its settings and run its supervisors until told to stop.

Owns process-edge wiring: settings, the layout check, lanes (one supervisor and engine per
LANES share of the cards), signals (the first SIGTERM/SIGINT stops claiming and gives the
running jobs SHUTDOWN_GRACE to finish before they are handed back to the queue; a second
one exits at once and leaves the jobs to their leases), and shutdown order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from i2v_fleet.pipeline.compile import parse_sizes
from i2v_fleet.pipeline.layout import LayoutError, ParallelLayout, lane_devices

from .engine import EngineConfig, EngineHost
from .engine.seam import Engine
from .engine.standin import StandInEngine
from .fetch import FetchPolicy
from .kafka import KafkaClients
from .settings import WorkerSettings
from .storage import ResultStore, StoreConfig
from .supervisor import Supervisor

log = logging.getLogger(__name__)


def node_cards(settings: WorkerSettings) -> tuple[str, int]:
    """The device kind and how many cards this node has (the CPU counts as one)."""
    from i2v_fleet.pipeline.devices import detect_kind, device_count

    kind = detect_kind(settings.device)
    return kind, device_count(kind)


def check_layout(settings: WorkerSettings, cards: int) -> ParallelLayout:
    """The lanes' layout, refused at start (LayoutError) when it cannot run the model."""
    import json

    layout = settings.engine_layout(cards)
    config = settings.model_ckpt_dir / "transformer" / "config.json"
    heads = 1
    if config.is_file():
        heads = json.loads(config.read_text()).get("num_attention_heads", 1)  # noqa: TID251 - a config file
    layout.check(heads)
    return layout


def build_lanes(settings: WorkerSettings) -> list[Supervisor]:
    """One supervisor per lane, each with its own engine on its share of the cards."""
    kind, cards = node_cards(settings)
    layout = check_layout(settings, cards)
    if kind == "cpu":
        shares: list[list[int]] = [[] for _ in range(settings.lanes)]
    else:
        shares = lane_devices(cards, settings.lanes)
        if layout.nproc > len(shares[0]):
            raise LayoutError(
                f"NPROC={layout.nproc} ranks per lane, but each of the {settings.lanes} "
                f"lanes has {len(shares[0])} of the node's {cards} cards"
            )
    return [build(settings.lane(i), layout, tuple(share)) for i, share in enumerate(shares)]


def result_store(settings: WorkerSettings) -> ResultStore:
    """The node's object store (MINIO_*), with its presign, retention and image limits."""
    return ResultStore(
        StoreConfig.from_settings(
            settings.object_store,
            presign_expiry_s=settings.presign_expiry_s,
            retention_days=settings.output_retention_days,
            max_image_bytes=settings.max_image_bytes,
        )
    )


def build(
    settings: WorkerSettings,
    layout: ParallelLayout | None = None,
    cards: tuple[int, ...] = (),
    *,
    clients: KafkaClients | None = None,
) -> Supervisor:
    """The supervisor of one lane, with its engine, store and fetch policy; `clients` builds
    its Kafka clients (aiokafka's from the settings by default)."""
    s = settings
    layout = layout or ParallelLayout(t5_cpu=s.t5_cpu)
    store = result_store(s)
    policy = FetchPolicy.from_env_value(
        s.allowed_hosts, max_bytes=s.max_image_bytes, deadline_s=s.fetch_timeout_s
    )
    engine: Engine
    if s.standin_engine:  # settings allow it only with I2V_TEST_TOOLS
        log.warning("STANDIN_ENGINE=%s: a test tool runs instead of the model", s.standin_engine)
        engine = StandInEngine(s.standin_engine, device=s.device or "cpu")
        return Supervisor(s, engine, store, policy, layout, clients=clients)
    engine = EngineHost(
        EngineConfig(
            model_dir=str(s.model_ckpt_dir),
            device=s.device,
            layout=layout,
            cards=cards,
            collective_timeout_s=s.collective_timeout_s,
            attention_backend=s.attention_backend,
            torch_compile=s.torch_compile,
            warmup_sizes=parse_sizes(s.compile_warmup_sizes),
            loras=s.model_loras,
            node_id=s.node_id,
        ),
        start_timeout_s=s.engine_start_timeout,
        stall_timeout_s=s.engine_stall_timeout,
    )
    return Supervisor(s, engine, store, policy, layout, clients=clients)


async def serve(settings: WorkerSettings) -> None:
    """Run until SIGTERM/SIGINT: the first stops claiming, a second exits immediately."""
    supervisors = build_lanes(settings)
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
        for supervisor in supervisors:
            supervisor.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await asyncio.gather(*(supervisor.run() for supervisor in supervisors))
