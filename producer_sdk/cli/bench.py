"""`i2v bench`: submit N jobs with at most C in flight and measure the fleet from its events.

Owns the load pattern and the report: queue wait, run time and end-to-end latency per job
and as percentiles, outcomes, retries and throughput. Must never open a consumer per job:
one follower of every `i2v.status` partition serves all of them.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from i2v_fleet.connection import KafkaSettings
from i2v_fleet.producer_sdk.client import AsyncClient
from i2v_fleet.producer_sdk.transport import KafkaTransport, Transport
from i2v_fleet.schemas import JOB_EVENT_ADAPTER, EventType, FailedEvent, SucceededEvent, utcnow

from ._common import err, out
from .jobs import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, _outcome

TIMED_OUT = "timed_out"
"""The outcome of a job with no final event within --timeout (it may still finish later)."""


@dataclass
class JobTiming:
    """One benchmark job as seen from here, on this machine's monotonic clock."""

    index: int
    job_id: str
    submit_called: float
    submitted: float | None = None
    """When `submit` returned: the request is acknowledged by the broker, so queued."""
    started: float | None = None
    """When the first `started` event arrived (queue wait ends)."""
    last_started: float | None = None
    """When the `started` event of the attempt that finished arrived (run time begins)."""
    ended: float | None = None
    outcome: str = "pending"
    error_code: str | None = None
    attempts: int = 1
    node_id: str | None = None
    node_run_s: float | None = None
    """Run time by the node's own event times (no delivery delay; the node's clock)."""
    phases: dict[str, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _started_time: Any = None

    def record(self, event: Any, now: float) -> None:
        """Fold one of this job's status events in (late ones after a time-out are ignored)."""
        if self.done.is_set():
            return
        self.attempts = max(self.attempts, event.attempt)
        if event.type == "started":
            self.started = self.started or now
            self.last_started, self._started_time = now, event.time
            self.node_id = event.node_id
        elif event.type == "requeued":
            self.attempts = max(self.attempts, event.next_attempt)
        elif EventType(event.type).is_terminal():
            self.ended, self.outcome = now, event.type
            self.node_id = event.node_id or self.node_id
            if self._started_time is not None:
                self.node_run_s = (event.time - self._started_time).total_seconds()
            if isinstance(event, FailedEvent):
                self.error_code = event.error.code.value
            if isinstance(event, SucceededEvent):
                self.phases = dict(event.result.timings)
            self.done.set()

    def durations(self) -> dict[str, float | None]:
        base = self.submitted if self.submitted is not None else self.submit_called

        def span(a: float | None, b: float | None) -> float | None:
            # A node can start a job before our submit call has returned; never below zero.
            return None if a is None or b is None else round(max(b - a, 0.0), 3)

        return {
            "submit_s": span(self.submit_called, self.submitted),
            "queue_wait_s": span(base, self.started),
            "run_s": span(self.last_started, self.ended),
            "e2e_s": span(base, self.ended),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "job_id": self.job_id,
            "outcome": self.outcome,
            "error_code": self.error_code,
            "attempts": self.attempts,
            "node_id": self.node_id,
            **self.durations(),
            "node_run_s": None if self.node_run_s is None else round(self.node_run_s, 3),
            "phases_s": self.phases,
        }


@dataclass(frozen=True)
class BenchSpec:
    """What to submit and how hard."""

    image: str
    prompt: str
    params: dict[str, Any]
    requests: int | None
    concurrency: int
    duration_s: float | None
    timeout_s: float


async def run_bench(
    transport: Transport, spec: BenchSpec, progress: Progress | None = None
) -> dict[str, Any]:
    """Run the benchmark through `transport` and return its report (the --export JSON)."""
    run_id = uuid.uuid4().hex[:12]
    jobs: dict[str, JobTiming] = {}
    async with AsyncClient(transport=transport) as client:
        status = client.topics.status
        partitions = [(status, p) for p in range(await transport.partitions(status))]
        # From a second before the first submit: no event of ours can be older.
        follower = asyncio.create_task(
            _follow(transport, partitions, int(time.time() * 1000) - 1000, jobs)
        )

        # The follower ends only by failing; then no job can end: release their waiters.
        def release_all(_: object) -> None:
            for job in jobs.values():
                job.done.set()

        follower.add_done_callback(release_all)
        task = progress.add_task("bench", total=spec.requests) if progress else None
        slots = asyncio.Semaphore(spec.concurrency)
        waiters: list[asyncio.Task[None]] = []
        began_at, began = utcnow(), time.monotonic()
        stop_at = began + spec.duration_s if spec.duration_s is not None else math.inf

        async def await_end(job: JobTiming) -> None:
            try:
                await asyncio.wait_for(job.done.wait(), spec.timeout_s)
            except asyncio.TimeoutError:
                job.outcome = TIMED_OUT
                job.done.set()
            finally:
                slots.release()
                if progress is not None and task is not None:
                    progress.advance(task)
                    _describe(progress, task, jobs)

        try:
            index = 0
            while spec.requests is None or index < spec.requests:
                await slots.acquire()
                if follower.done() or time.monotonic() >= stop_at:
                    slots.release()
                    break
                job = JobTiming(index, str(uuid.uuid4()), time.monotonic())
                jobs[job.job_id] = job  # before submit: its `started` may beat the ack here
                meta = {"bench": run_id, "bench_index": str(index)}
                try:
                    await client.submit(
                        spec.image, spec.prompt, job_id=job.job_id, metadata=meta, **spec.params
                    )
                except BaseException:
                    del jobs[job.job_id]
                    slots.release()
                    raise
                job.submitted = time.monotonic()
                waiters.append(asyncio.create_task(await_end(job)))
                index += 1
                if progress is not None and task is not None:
                    _describe(progress, task, jobs)
            await asyncio.gather(*waiters)
            if follower.done():
                follower.result()  # raises the follower's BrokerError
        finally:
            follower.cancel()
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, follower, return_exceptions=True)
    ends = [j.ended for j in jobs.values() if j.ended is not None]
    wall_s = (max(ends) if ends else time.monotonic()) - began
    return _report(run_id, spec, began_at.isoformat(), wall_s, list(jobs.values()))


async def _follow(
    transport: Transport,
    partitions: Sequence[tuple[str, int]],
    since_ms: int,
    jobs: dict[str, JobTiming],
) -> None:
    async for record in transport.follow(partitions, since_ms):
        if record.key is None or record.value is None:
            continue
        job = jobs.get(record.key.decode(errors="replace"))
        if job is not None:
            job.record(JOB_EVENT_ADAPTER.validate_json(record.value), time.monotonic())


def _describe(progress: Progress, task: Any, jobs: dict[str, JobTiming]) -> None:
    counts = Counter(j.outcome for j in jobs.values())
    running = sum(1 for j in jobs.values() if j.started and not j.done.is_set())
    queued = sum(1 for j in jobs.values() if not j.started and not j.done.is_set())
    progress.update(
        task,
        description=f"{queued} queued, {running} running, {counts['succeeded']} ok, "
        f"{len(jobs) - counts['pending'] - counts['succeeded']} not ok",
    )


def _ended(outcome: str) -> bool:
    """True for an outcome that is a final event's type (not `pending`, not TIMED_OUT)."""
    try:
        return EventType(outcome).is_terminal()
    except ValueError:
        return False


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max/mean of `values`, linearly interpolated between ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}

    def pct(q: float) -> float:
        pos = (len(xs) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    stats = {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": xs[-1]}
    return {
        "n": len(xs),
        **{k: round(v, 3) for k, v in stats.items()},
        "mean": round(sum(xs) / len(xs), 3),
    }


def _report(
    run_id: str, spec: BenchSpec, began_at: str, wall_s: float, jobs: list[JobTiming]
) -> dict[str, Any]:
    rows = [j.to_json() for j in sorted(jobs, key=lambda j: j.index)]
    outcomes = Counter(r["outcome"] for r in rows)
    phases: dict[str, list[float]] = {}
    for r in rows:
        for name, seconds in r["phases_s"].items():
            phases.setdefault(name, []).append(seconds)
    finished = sum(n for k, n in outcomes.items() if _ended(k))
    return {
        "run_id": run_id,
        "began_at": began_at,
        "config": {
            "image": spec.image,
            "prompt": spec.prompt,
            "params": spec.params,
            "requests": spec.requests,
            "concurrency": spec.concurrency,
            "duration_s": spec.duration_s,
            "timeout_s": spec.timeout_s,
        },
        "summary": {
            "jobs": len(rows),
            "outcomes": dict(outcomes),
            "error_codes": dict(Counter(r["error_code"] for r in rows if r["error_code"])),
            "attempts_gt1": sum(1 for r in rows if r["attempts"] > 1),
            "wall_s": round(wall_s, 3),
            "jobs_per_hour": round(outcomes["succeeded"] / wall_s * 3600, 2)
            if wall_s > 0
            else None,
            "finished_per_hour": round(finished / wall_s * 3600, 2) if wall_s > 0 else None,
            **{
                key: percentiles([r[key] for r in rows if r[key] is not None])
                for key in ("queue_wait_s", "run_s", "e2e_s", "submit_s")
            },
            "phases_mean_s": {k: round(sum(v) / len(v), 3) for k, v in sorted(phases.items())},
        },
        "jobs": rows,
    }


def _show(report: dict[str, Any], max_rows: int = 50) -> None:
    rows, summary = report["jobs"], report["summary"]
    if rows and len(rows) <= max_rows:
        table = Table("#", "job", "outcome", "tries", "node", "queue s", "run s", "e2e s")
        for r in rows:
            outcome = r["outcome"] + (f" ({r['error_code']})" if r["error_code"] else "")
            table.add_row(
                str(r["index"]),
                r["job_id"][:8],
                outcome,
                str(r["attempts"]),
                r["node_id"] or "-",
                *(_num(r[k]) for k in ("queue_wait_s", "run_s", "e2e_s")),
            )
        out.print(table)
    agg = Table(
        "seconds", "n", "p50", "p90", "p99", "max", "mean", title=f"bench {report['run_id']}"
    )
    for key, label in (("queue_wait_s", "queue wait"), ("run_s", "run"), ("e2e_s", "end to end")):
        s = summary[key]
        agg.add_row(label, str(s["n"]), *(_num(s[k]) for k in ("p50", "p90", "p99", "max", "mean")))
    out.print(agg)
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(summary["outcomes"].items()))
    codes = ", ".join(f"{k} {v}" for k, v in sorted(summary["error_codes"].items())) or "none"
    out.print(
        f"{summary['jobs']} job(s): {outcomes}; error codes: {codes}; "
        f"retried (attempts > 1): {summary['attempts_gt1']}\n"
        f"wall {summary['wall_s']:.1f} s, {_num(summary['jobs_per_hour'], 1)} succeeded jobs/hour",
        markup=False,
    )


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def bench(
    image: Annotated[str, typer.Option(help="A JPEG/PNG/WebP file (≤ 1 MiB) or an http(s) URL.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt of every job.")],
    requests: Annotated[
        int | None,
        typer.Option(min=1, help="Jobs to submit (default 10; unlimited with --duration)."),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Most jobs in flight at once.")
    ] = 1,
    size: Annotated[str | None, typer.Option(help="width*height, e.g. 480*832.")] = None,
    frames: Annotated[int | None, typer.Option(help="4n+1 frames.")] = None,
    preset: Annotated[str, typer.Option(help="fast, balanced, high or custom.")] = "fast",
    steps: Annotated[int | None, typer.Option(help="Denoising steps (custom preset).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (custom preset).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every job.")] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop submitting after S seconds; in-flight jobs end.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Give up on a job S seconds after submitting it.")
    ] = 3600.0,
    export: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
) -> None:
    """Load the fleet: N jobs, at most C in flight; report queue wait, run time, e2e, jobs/hour.

    Exit 0: all succeeded; 1: any failed or was cancelled; 4: some did not end in --timeout.
    """
    params: dict[str, Any] = {
        "quality_preset": preset,
        "image_size": size,
        "num_frames": frames,
        "infer_steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
    }
    spec = BenchSpec(
        image=image,
        prompt=prompt,
        params={k: v for k, v in params.items() if v is not None},
        requests=requests if requests is not None or duration is not None else 10,
        concurrency=concurrency,
        duration_s=duration,
        timeout_s=timeout,
    )

    async def run() -> int:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            report = await run_bench(KafkaTransport(KafkaSettings()), spec, progress)
        _show(report)
        if export is not None:
            export.write_text(json.dumps(report, indent=2) + "\n")
            err.print(f"report written to {export}")
        outcomes = report["summary"]["outcomes"]
        if any(k not in {"succeeded", TIMED_OUT} for k in outcomes):
            return EXIT_FAILED
        return EXIT_TIMEOUT if outcomes.get(TIMED_OUT) else EXIT_OK

    raise typer.Exit(_outcome(run))
