"""`i2v monitor`: poll nodes' ops endpoints (/healthz, /readyz, /metrics, /info) on an interval.

Owns what an operator watching the fleet sees: a live table (or one line per node per sample
when not on a terminal), alerts as they open and clear, and a JSON report with --export.
Must never import the node's packages: it speaks HTTP and reads `i2v.nodes` through the SDK.

Over 400 lines, knowingly: one command's sampling, alert episodes, two renderings (table
and lines) and the export; they share the sample's shape and nothing else uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import TypeAdapter, ValidationError
from rich.live import Live
from rich.table import Table

from i2v_fleet.producer_sdk.client import AsyncClient
from i2v_fleet.producer_sdk.errors import I2VError
from i2v_fleet.producer_sdk.settings import KafkaSettings
from i2v_fleet.producer_sdk.transport import KafkaTransport, Transport
from i2v_fleet.schemas import NODE_INFO_ADAPTER, NodeInfo, NodeState, utcnow

from ._common import err, out
from .jobs import EXIT_FAILED, EXIT_OK, _outcome

ENDPOINTS = ("healthz", "readyz", "metrics", "info")
_JSON: TypeAdapter[Any] = TypeAdapter(Any)
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# -- one poll --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One GET: the HTTP status (None when unreachable), its latency, and its body."""

    status: int | None
    ms: float
    body: bytes = b""
    error: str | None = None


def fetch(url: str, timeout: float) -> Probe:
    """GET `url` (blocking: run it in a thread); never raises."""
    began = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body, status = response.read(), int(response.status)
    except urllib.error.HTTPError as exc:  # a non-2xx answer: the node is up and says why
        body, status = exc.read(), exc.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Probe(None, _ms(began), error=f"{type(exc).__name__}: {reason}")
    return Probe(status, _ms(began), body)


def parse_prometheus(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample line of the Prometheus text format."""
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        with contextlib.suppress(ValueError):
            labels = dict(_LABEL.findall(match.group(2) or ""))
            yield match.group(1), labels, float(match.group(3))


def job_counters(text: str) -> dict[str, Any]:
    """The node's job counters from its /metrics (names from consumer/metrics.py)."""
    jobs: dict[str, float] = {}
    requeues: dict[str, float] = {}
    found: dict[str, Any] = {"in_flight": None, "engine_restarts": None}
    wait_sum = wait_count = 0.0
    for name, labels, value in parse_prometheus(text):
        if name == "i2v_jobs_total":
            key = labels.get("outcome", "?") + (f":{labels['code']}" if labels.get("code") else "")
            jobs[key] = jobs.get(key, 0) + value
        elif name == "i2v_requeues_total":
            requeues[labels.get("reason", "?")] = value
        elif name == "i2v_jobs_in_flight":
            found["in_flight"] = value
        elif name == "i2v_engine_restarts_total":
            found["engine_restarts"] = value
        elif name in {"i2v_dead_letters_total", "i2v_reaped_total", "i2v_group_leaves_total"}:
            found[name.removeprefix("i2v_").removesuffix("_total")] = value
        elif name == "i2v_queue_wait_seconds_sum":
            wait_sum = value
        elif name == "i2v_queue_wait_seconds_count":
            wait_count = value
    return {
        "jobs": {k: int(v) for k, v in sorted(jobs.items())},
        "jobs_total": int(sum(jobs.values())),
        **found,
        "requeues": int(sum(requeues.values())),
        "requeues_by_reason": {k: int(v) for k, v in sorted(requeues.items())},
        "queue_wait_mean_s": round(wait_sum / wait_count, 3) if wait_count else None,
    }


def memory_pct(*sources: Any) -> float | None:
    """The fullest device's memory use in percent, from the first source that reports one.

    Sources are NodeInfo or JSON bodies (/healthz, /info) that may carry `devices` (with
    `memory_used_bytes` or `memory_free_bytes`, and `memory_total_bytes`) or `memory`.
    """
    for source in sources:
        if isinstance(source, NodeInfo):
            source = source.model_dump()
        if not isinstance(source, dict):
            continue
        pcts = []
        devices = source.get("devices")
        for d in [*(devices if isinstance(devices, list) else []), source.get("memory")]:
            if not isinstance(d, dict):
                continue
            if isinstance(d.get("percent"), (int, float)):
                pcts.append(float(d["percent"]))
                continue
            total = d.get("memory_total_bytes") or d.get("total_bytes")
            used = d.get("memory_used_bytes", d.get("used_bytes"))
            free = d.get("memory_free_bytes", d.get("free_bytes"))
            if used is None and free is not None and total:
                used = total - free
            if total and used is not None:
                pcts.append(100.0 * used / total)
        if pcts:
            return round(max(pcts), 1)
    return None


async def poll(url: str, node: NodeInfo | None, timeout: float) -> dict[str, Any]:
    """One sample of a node: its four endpoints, fetched at once."""
    probes = await asyncio.gather(
        *(asyncio.to_thread(fetch, f"{url.rstrip('/')}/{e}", timeout) for e in ENDPOINTS)
    )
    sample: dict[str, Any] = {"time": utcnow().isoformat()}
    bodies: dict[str, Any] = {}
    for endpoint, probe in zip(ENDPOINTS, probes, strict=True):
        entry: dict[str, Any] = {"status": probe.status, "ms": probe.ms}
        if probe.error:
            entry["error"] = probe.error
        if endpoint == "metrics" and probe.status == 200:
            entry.update(job_counters(probe.body.decode(errors="replace")))
        elif probe.body and endpoint != "metrics":
            with contextlib.suppress(ValidationError):
                bodies[endpoint] = _JSON.validate_json(probe.body)
        sample[endpoint] = entry
    health, ready, info = (bodies.get(e) for e in ("healthz", "readyz", "info"))
    if isinstance(ready, dict) and isinstance(ready.get("checks"), dict):
        sample["readyz"]["checks"] = ready["checks"]
    if isinstance(info, dict):
        keep = ("node_id", "device", "engine_alive", "engine_restarts", "uptime_s", "current_job")
        sample["info"].update({k: info[k] for k in keep if k in info})
    sample["memory_pct"] = memory_pct(health, node, info)
    sample["reachable"] = any(p.status is not None for p in probes)
    sample["ok"] = all(p.status == 200 for p in probes)
    return sample


# -- many polls -------------------------------------------------------------------------------


@dataclass
class NodeTrack:
    """What the monitor knows of one node across samples."""

    url: str
    node_id: str | None = None
    info: NodeInfo | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def availability(self, endpoints: tuple[str, ...] = ("healthz", "readyz")) -> float | None:
        if not self.samples:
            return None
        up = sum(all(s[e]["status"] == 200 for e in endpoints) for s in self.samples)
        return round(100.0 * up / len(self.samples), 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "node_id": self.node_id,
            "availability_pct": self.availability(),
            "healthz_ok_pct": self.availability(("healthz",)),
            "reachable_pct": round(
                100.0 * sum(s["reachable"] for s in self.samples) / len(self.samples), 2
            )
            if self.samples
            else None,
            "samples": self.samples,
        }


@dataclass
class Alerts:
    """Alert episodes: one opens when a condition starts and closes when it clears."""

    high_memory_pct: float | None
    open: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    closed: list[dict[str, Any]] = field(default_factory=list)

    def update(self, node: NodeTrack, sample: dict[str, Any]) -> None:
        now = sample["time"]
        active: dict[tuple[str, str, str], str] = {}
        if not sample["reachable"]:
            active[(node.url, "unreachable", "*")] = sample["healthz"].get("error", "")
        else:
            for e in ENDPOINTS:
                status = sample[e]["status"]
                if status is None:
                    active[(node.url, "unreachable", e)] = sample[e].get("error", "")
                elif status != 200:
                    active[(node.url, "http_error", e)] = f"HTTP {status}"
        mem = sample["memory_pct"]
        if self.high_memory_pct is not None and mem is not None and mem >= self.high_memory_pct:
            active[(node.url, "high_memory", "*")] = f"{mem:.1f}% >= {self.high_memory_pct}%"
        for key in [k for k in self.open if k[0] == node.url and k not in active]:
            alert = self.open.pop(key)
            alert["until"] = now
            self.closed.append(alert)
            err.print(f"[green]resolved[/] {_label(node)} {key[1]} {key[2]}")
        for key, detail in active.items():
            if key in self.open:
                self.open[key].update(samples=self.open[key]["samples"] + 1, detail=detail)
                continue
            self.open[key] = {
                "node": node.node_id or node.url,
                "url": node.url,
                "kind": key[1],
                "endpoint": key[2],
                "since": now,
                "until": None,
                "samples": 1,
                "detail": detail,
            }
            err.print(f"[red]ALERT[/] {_label(node)} {key[1]} {key[2]}: {detail}", markup=True)

    def all(self) -> list[dict[str, Any]]:
        return sorted([*self.closed, *self.open.values()], key=lambda a: str(a["since"]))


async def _discover(
    client: AsyncClient,
    transport: Transport,
    nodes: dict[str, NodeInfo],
    stale_s: float,
    caught_up: asyncio.Event,
) -> None:
    """Keep `nodes` (node_id -> latest NodeInfo) current from i2v.nodes: the recent past
    first (then `caught_up` is set), then one follower for the rest of the run. A broker
    failure is reported, and the nodes already known are still polled."""
    try:
        for info in await client.nodes(lookback=timedelta(seconds=stale_s)):
            nodes[info.node_id] = info
        caught_up.set()
        topic = client.topics.nodes
        partitions = [(topic, p) for p in range(await transport.partitions(topic))]
        async for record in transport.follow(partitions, int(time.time() * 1000)):
            if record.value is not None:
                with contextlib.suppress(ValidationError):
                    info = NODE_INFO_ADAPTER.validate_json(record.value)
                    nodes[info.node_id] = info
    except I2VError as exc:
        err.print(f"[red]i2v.nodes unreadable[/] ({exc}); polling the nodes known so far")
    finally:
        caught_up.set()


def _targets(
    urls: list[str], nodes: dict[str, NodeInfo], tracks: dict[str, NodeTrack], stale_s: float
) -> list[NodeTrack]:
    now = utcnow()
    for url in urls:
        tracks.setdefault(url.rstrip("/"), NodeTrack(url.rstrip("/")))
    wanted = {u.rstrip("/") for u in urls}
    for info in nodes.values():
        fresh = (now - info.time).total_seconds() <= stale_s
        if info.ops_url and fresh and info.state is not NodeState.STOPPED:
            track = tracks.setdefault(info.ops_url, NodeTrack(info.ops_url))
            track.node_id, track.info = info.node_id, info
            wanted.add(info.ops_url)
    return [tracks[u] for u in sorted(wanted)]


def _label(node: NodeTrack) -> str:
    return f"{node.node_id} ({node.url})" if node.node_id else node.url


def _line(node: NodeTrack, s: dict[str, Any]) -> str:
    m = s["metrics"]
    mem = "-" if s["memory_pct"] is None else f"{s['memory_pct']:.0f}%"
    return (
        f"{s['time'][11:19]} {_label(node)} healthz {s['healthz']['status'] or 'down'} "
        f"readyz {s['readyz']['status'] or 'down'} in_flight {_n(m.get('in_flight'))} "
        f"jobs {_jobs(m)} restarts {_n(m.get('engine_restarts'))} requeues "
        f"{_n(m.get('requeues'))} mem {mem} {s['healthz']['ms']:.0f}ms "
        f"avail {node.availability()}%"
    )


def _table(tracks: list[NodeTrack]) -> Table:
    table = Table(
        "node", "health", "ready", "in flight", "jobs", "restarts", "requeues", "mem", "ms", "avail"
    )
    for node in tracks:
        if not node.samples:
            continue
        s, m = node.samples[-1], node.samples[-1]["metrics"]
        table.add_row(
            _label(node),
            _status(s["healthz"]["status"]),
            _status(s["readyz"]["status"]),
            _n(m.get("in_flight")),
            _jobs(m),
            _n(m.get("engine_restarts")),
            _n(m.get("requeues")),
            "-" if s["memory_pct"] is None else f"{s['memory_pct']:.0f}%",
            f"{s['healthz']['ms']:.0f}",
            f"{node.availability()}%",
        )
    return table


def _status(code: int | None) -> str:
    return "[red]down[/]" if code is None else (str(code) if code == 200 else f"[red]{code}[/]")


def _jobs(m: dict[str, Any]) -> str:
    jobs = m.get("jobs")
    if not isinstance(jobs, dict):
        return "-"
    return ",".join(f"{k}={v}" for k, v in jobs.items()) or "0"


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def _ms(began: float) -> float:
    return round((time.monotonic() - began) * 1000, 1)


def monitor(
    url: Annotated[
        list[str] | None, typer.Option("--url", help="A node's ops base URL; repeat for more.")
    ] = None,
    from_nodes: Annotated[
        bool, typer.Option("--from-nodes", help="Also poll every node announced on i2v.nodes.")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between samples.")] = 10.0,
    duration: Annotated[
        float | None, typer.Option(help="Stop after S seconds (default: until Ctrl-C).")
    ] = None,
    export: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    alert_on_error: Annotated[
        bool,
        typer.Option("--alert-on-error", help="Exit 1 if any endpoint was unreachable or not 200."),
    ] = False,
    alert_on_high_memory: Annotated[
        float | None, typer.Option(help="Alert (and exit 1) when a node's memory use ≥ PCT %.")
    ] = None,
    stale: Annotated[
        float, typer.Option(help="With --from-nodes: skip nodes silent for S seconds.")
    ] = 120.0,
) -> None:
    """Watch nodes' health, readiness, job counters and memory; export samples and alerts."""
    if not url and not from_nodes:
        err.print("[red]nothing to monitor:[/] give --url (repeatable) or --from-nodes")
        raise typer.Exit(2)
    urls = list(url or [])
    alerts = Alerts(alert_on_high_memory)
    tracks: dict[str, NodeTrack] = {}
    warned: list[bool] = []

    async def sample_all(nodes: dict[str, NodeInfo], live: Live | None) -> None:
        targets = _targets(urls, nodes, tracks, stale)
        if not targets and not warned:
            warned.append(True)
            err.print("[yellow]no nodes to poll yet[/]: none announced on i2v.nodes recently")
        timeout = min(5.0, max(1.0, interval))
        samples = await asyncio.gather(*(poll(t.url, t.info, timeout) for t in targets))
        for node, sample in zip(targets, samples, strict=True):
            node.node_id = node.node_id or sample["info"].get("node_id")
            if node.info is not None:  # as announced on i2v.nodes
                sample["announced"] = {
                    "state": node.info.state.value,
                    "time": node.info.time.isoformat(),
                }
            node.samples.append(sample)
            alerts.update(node, sample)
            if live is None:
                out.print(_line(node, sample), markup=False)
        if live is not None:
            live.update(_table(targets))

    async def loop(nodes: dict[str, NodeInfo]) -> None:
        began = time.monotonic()
        end = began + duration if duration is not None else math.inf
        live = Live(console=out, auto_refresh=False) if out.is_terminal else None
        with live if live is not None else contextlib.nullcontext():
            tick = 0
            while began + tick * interval < end:
                await asyncio.sleep(max(0.0, began + tick * interval - time.monotonic()))
                await sample_all(nodes, live)
                if live is not None:
                    live.refresh()
                tick += 1

    async def run() -> int:
        began_at = utcnow()
        nodes: dict[str, NodeInfo] = {}
        try:
            if from_nodes:
                transport = KafkaTransport(KafkaSettings())
                async with AsyncClient(transport=transport) as client:
                    caught_up = asyncio.Event()
                    discovery = asyncio.create_task(
                        _discover(client, transport, nodes, stale, caught_up)
                    )
                    await caught_up.wait()  # the first sample polls the nodes known now
                    try:
                        await loop(nodes)
                    finally:
                        discovery.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await discovery
            else:
                await loop(nodes)
        except (KeyboardInterrupt, asyncio.CancelledError):
            err.print("stopped")
        found = alerts.all()
        if from_nodes and not tracks:
            found.append({"node": "*", "kind": "no_nodes", "since": began_at.isoformat()})
        report = {
            "began_at": began_at.isoformat(),
            "ended_at": utcnow().isoformat(),
            "interval_s": interval,
            "duration_s": duration,
            "nodes": [t.to_json() for t in sorted(tracks.values(), key=lambda t: t.url)],
            "alerts": found,
        }
        if export is not None:
            export.write_text(json.dumps(report, indent=2) + "\n")
            err.print(f"report written to {export}")
        for t in sorted(tracks.values(), key=lambda t: t.url):
            err.print(f"{_label(t)}: {len(t.samples)} samples, available {t.availability()}%")
        kinds = {a["kind"] for a in found}
        fired = (alert_on_error and bool(kinds - {"high_memory"})) or (
            alert_on_high_memory is not None and "high_memory" in kinds
        )
        if found:
            err.print(f"[yellow]{len(found)} alert(s)[/]: " + ", ".join(sorted(kinds)))
        return EXIT_FAILED if fired else EXIT_OK

    raise typer.Exit(_outcome(run))
