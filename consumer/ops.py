"""The node's ops HTTP server: /healthz, /readyz, /metrics and /info (aiohttp).

Owns what operators and Kubernetes probes see. Must never expose secrets: settings are
shown without credentials and URLs without query strings.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .supervisor import Supervisor


SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor")


def make_app(supervisor: Supervisor) -> web.Application:
    app = web.Application()
    app[SUPERVISOR] = supervisor
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/info", _info)
    return app


async def start(supervisor: Supervisor, host: str, port: int) -> web.AppRunner:
    """Serve in the supervisor's event loop; returns the runner (its `.addresses` say where)."""
    runner = web.AppRunner(make_app(supervisor), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def url_of(runner: web.AppRunner, host: str) -> str | None:
    """The ops server's base URL as others can reach it (the bound port, a routable host)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            shown = platform.node() if host in ("0.0.0.0", "::", "") else host
            return f"http://{shown}:{address[1]}"
    return None


async def _healthz(request: web.Request) -> web.Response:
    """Alive: the loop answers, and the engine runs (or is being started)."""
    sup = request.app[SUPERVISOR]
    ok = sup.engine.alive or not sup.ready.is_set()
    return web.json_response({"status": "ok" if ok else "engine down"}, status=200 if ok else 503)


async def _readyz(request: web.Request) -> web.Response:
    """Ready: model loaded, claiming from Kafka (the broker answers), object store reachable."""
    sup = request.app[SUPERVISOR]
    checks = {
        "model_loaded": sup.engine.alive,
        "kafka": sup.ready.is_set() and sup.broker is not None and sup.broker.reachable,
        "cancel_reader": sup.control is not None and sup.control.alive,
        "reaper": sup.reaper is not None and sup.reaper.alive,
        "object_store": await sup.store.ping(),
    }
    ok = all(checks.values())
    return web.json_response(
        {"status": "ready" if ok else "not ready", "checks": checks}, status=200 if ok else 503
    )


async def _metrics(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    body = generate_latest(sup.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _info(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    s, stats = sup.settings, sup.stats
    ready = sup.engine.ready
    current: dict[str, Any] | None = None
    if stats.current is not None:
        job = stats.current
        current = {
            "job_id": str(job.job_id),
            "attempt": job.attempt,
            "phase": stats.current_phase,
            "step": stats.current_step[0],
            "total_steps": stats.current_step[1],
            "image_size": job.image_size.value,
            "num_frames": job.num_frames,
        }
    return web.json_response(
        {
            "node_id": s.node_id,
            "uptime_s": round(time.monotonic() - stats.started_at, 1),
            "device": sup.engine.device,
            "engine_alive": sup.engine.alive,
            "engine_restarts": sup.engine.restarts,
            "attention_backend": ready.attention_backend if ready else None,
            "attention_timings_ms": ready.attention_timings_ms if ready else {},
            "torch_compile": s.torch_compile,
            "compile_s": ready.compile_s if ready else None,
            "layout": sup.layout().model_dump(),
            "ranks": [dataclasses.asdict(r) for r in sup.engine.ranks],
            "model_dir": str(s.model_ckpt_dir),
            "kafka": s.kafka.bootstrap_servers,
            "object_store": f"{s.object_store.endpoint}/{s.object_store.bucket}",
            "outcomes": stats.outcomes,
            "current_job": current,
            "requests_partitions": sup.claiming(),
            "reaper": None
            if sup.reaper is None
            else {
                "status_partitions": sorted(sup.reaper.partitions),
                "open_jobs": sup.reaper.open_jobs,
                "reaped": sup.reaper.reaped,
            },
        }
    )
