"""`i2v submit|watch|status|cancel|nodes|queue`: the client side of the fleet on the command line.

Owns the terminal experience: a progress bar (phase, step, percent, ETA, node) that ends
with the result URL or the error, `--json` for scripts, and exit codes that tell the
outcomes apart: 0 succeeded, 1 failed, 2 invalid input, 3 cancelled, 4 timed out waiting,
5 broker unreachable.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from i2v_fleet.producer_sdk.client import AsyncClient, Event
from i2v_fleet.producer_sdk.errors import (
    BrokerError,
    InvalidJob,
    JobCancelled,
    JobFailed,
    WaitTimeout,
)
from i2v_fleet.schemas import (
    JOB_EVENT_ADAPTER,
    WORKERS_GROUP,
    CancelledEvent,
    FailedEvent,
    ProgressEvent,
    SucceededEvent,
)

from ._common import err, out

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED, EXIT_TIMEOUT, EXIT_BROKER = 0, 1, 2, 3, 4, 5

Json = Annotated[bool, typer.Option("--json", help="Machine-readable output, one JSON per line.")]


def submit(
    image: Annotated[str, typer.Argument(help="A JPEG/PNG/WebP file (≤ 1 MiB) or an http(s) URL.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What should happen.")],
    preset: Annotated[str, typer.Option(help="fast, balanced, high or custom.")] = "balanced",
    size: Annotated[str | None, typer.Option(help="width*height, e.g. 832*480.")] = None,
    frames: Annotated[int | None, typer.Option(help="4n+1 frames (default 81).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible video.")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What to avoid.")] = None,
    ttl: Annotated[int | None, typer.Option(help="Seconds the job may wait in the queue.")] = None,
    job_timeout: Annotated[
        int | None, typer.Option("--job-timeout", help="Run-time limit of the job (s).")
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="Your own job id (idempotent).")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--meta", help="key=value echoed in every event.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Show progress until the end.")] = False,
    download: Annotated[Path | None, typer.Option(help="Save the MP4 here when done.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after N s.")] = None,
    as_json: Json = False,
) -> None:
    """Submit a job; with --watch or --wait follow it to its video (or its error)."""
    params: dict[str, Any] = {
        "quality_preset": preset,
        "image_size": size,
        "num_frames": frames,
        "infer_steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "negative_prompt": negative_prompt,
        "ttl_s": ttl,
        "timeout_s": job_timeout,
        "metadata": dict(item.split("=", 1) for item in metadata or [] if "=" in item),
    }
    params = {k: v for k, v in params.items() if v is not None}
    follow = watch or wait or download is not None

    async def run() -> int:
        async with AsyncClient() as client:
            job = await client.submit(image, prompt, job_id=job_id, **params)
            if as_json:
                out.print_json(
                    json.dumps(
                        {
                            "job_id": str(job.job_id),
                            "partition": job.partition,
                            "offset": job.offset,
                        }
                    )
                )
            else:
                err.print(f"submitted {job.job_id}")
            if not follow:
                if not as_json:
                    out.print(str(job.job_id))
                return EXIT_OK
            return await _follow(
                client, str(job.job_id), watch and not as_json, as_json, download, timeout
            )

    raise typer.Exit(_outcome(run))


def watch_(
    job_id: Annotated[str, typer.Argument(help="The job to follow.")],
    download: Annotated[Path | None, typer.Option(help="Save the MP4 here when done.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up after N s.")] = None,
    as_json: Json = False,
) -> None:
    """Follow a job (replaying what already happened) to its final event."""

    async def run() -> int:
        async with AsyncClient() as client:
            return await _follow(client, job_id, not as_json, as_json, download, timeout)

    raise typer.Exit(_outcome(run))


def status(job_id: Annotated[str, typer.Argument(help="The job.")], as_json: Json = False) -> None:
    """Show a job's latest known state (from the last day of events)."""

    async def run() -> int:
        async with AsyncClient() as client:
            st = await client.status(job_id)
        if as_json:
            out.print_json(
                json.dumps(
                    {
                        "job_id": str(st.job_id),
                        "state": st.state.value,
                        "attempt": st.attempt,
                        "node_id": st.node_id,
                        "result": st.result.model_dump(mode="json") if st.result else None,
                        "error": st.error.model_dump(mode="json") if st.error else None,
                        "progress": st.progress.model_dump(mode="json") if st.progress else None,
                    }
                )
            )
        else:
            line = f"{st.job_id}  {st.state.value}"
            if st.node_id:
                line += f"  attempt {st.attempt} on {st.node_id}"
            if st.progress:
                line += f"  {st.progress.phase.value} {st.progress.percent:.0f}%"
            if st.result:
                line += f"\n  {st.result.url}"
            if st.error:
                line += f"\n  {st.error.code.value}: {st.error.message}"
            out.print(line, markup=False)
        return EXIT_OK

    raise typer.Exit(_outcome(run))


def cancel(
    job_id: Annotated[str, typer.Argument(help="The job.")],
    reason: Annotated[str | None, typer.Option(help="Why; shown in its cancelled event.")] = None,
) -> None:
    """Cancel a job: queued, it never runs; running, it stops at its next step."""

    async def run() -> int:
        async with AsyncClient() as client:
            await client.cancel(job_id, reason=reason, requested_by="i2v-cli")
        err.print(f"cancel requested for {job_id}")
        return EXIT_OK

    raise typer.Exit(_outcome(run))


def nodes(as_json: Json = False) -> None:
    """List the nodes heard from in the last day (from i2v.nodes)."""

    async def run() -> int:
        async with AsyncClient() as client:
            found = await client.nodes()
        if as_json:
            for node in found:
                out.print(node.model_dump_json(), markup=False)
            return EXIT_OK
        table = Table(
            "node", "state", "device", "layout", "presets", "jobs ok/failed", "current", "seen"
        )
        for n in found:
            table.add_row(
                n.node_id,
                n.state.value,
                n.device.value,
                f"{n.layout.nproc} rank(s)",
                ", ".join(n.presets) or "-",
                f"{n.jobs_succeeded}/{n.jobs_failed}",
                ", ".join(str(j) for j in n.current_jobs) or "-",
                n.time.strftime("%H:%M:%S"),
            )
        out.print(table)
        return EXIT_OK

    raise typer.Exit(_outcome(run))


def queue(
    group: Annotated[str, typer.Option(help="The workers' consumer group.")] = WORKERS_GROUP,
    as_json: Json = False,
) -> None:
    """Jobs waiting in i2v.requests, per partition and in total."""

    async def run() -> int:
        async with AsyncClient() as client:
            depth = await client.queue(group)
        if as_json:
            out.print_json(json.dumps({"total": depth.total, "partitions": depth.partitions}))
        else:
            out.print(
                f"{depth.total} job(s) waiting  "
                + "  ".join(f"p{p}:{n}" for p, n in sorted(depth.partitions.items()))
            )
        return EXIT_OK

    raise typer.Exit(_outcome(run))


# -- shared --------------------------------------------------------------------------------


async def _follow(
    client: AsyncClient,
    job_id: str,
    bar: bool,
    as_json: bool,
    download: Path | None,
    timeout: float | None,
) -> int:
    async def loop() -> SucceededEvent:
        with Progress(
            TextColumn("{task.description:<15}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[step]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[node]}"),
            console=err,
            disable=not bar,
        ) as progress:
            task = progress.add_task("queued", total=100, step="", eta="-", node="")
            async for event in client.watch(job_id):
                if as_json:
                    out.print(_dump(event), markup=False, soft_wrap=True)
                _show(progress, task, event)
                if isinstance(event, SucceededEvent):
                    return event
                if isinstance(event, FailedEvent):
                    e = event.error
                    raise JobFailed(event.job_id, e.code.value, e.message, e.retryable)
                if isinstance(event, CancelledEvent):
                    raise JobCancelled(event.job_id, event.reason)
        raise WaitTimeout(f"the events of job {job_id} ended without a final one")

    try:
        final = await asyncio.wait_for(loop(), timeout)
    except asyncio.TimeoutError:
        raise WaitTimeout(f"job {job_id} did not finish within {timeout} s") from None
    if download is not None:
        data = await asyncio.to_thread(lambda: urllib.request.urlopen(final.result.url).read())
        await asyncio.to_thread(download.write_bytes, data)
        err.print(f"saved {download}")
    if not as_json:
        r = final.result
        err.print(f"[green]succeeded[/]: {r.width}x{r.height}, {r.num_frames} frames")
        out.print(r.url, markup=False, soft_wrap=True)
    return EXIT_OK


def _show(progress: Progress, task: Any, event: Event) -> None:
    if isinstance(event, ProgressEvent):
        eta = f"{event.eta_s:.0f}s" if event.eta_s is not None else "-"
        progress.update(
            task,
            description=event.phase.value,
            completed=event.percent,
            step=f"{event.step}/{event.total_steps}",
            eta=eta,
        )
    elif event.type in {"started", "requeued"}:
        progress.update(task, description=event.type, node=event.node_id)
    elif event.type == "succeeded":
        progress.update(task, description="succeeded", completed=100, eta="-")
    elif event.type in {"failed", "cancelled"}:
        progress.update(task, description=event.type)


def _dump(event: Event) -> str:
    if isinstance(event, ProgressEvent):
        return event.model_dump_json()
    return JOB_EVENT_ADAPTER.dump_json(event).decode()


def _outcome(run: Any) -> int:
    """Run the command's coroutine and turn our exceptions into a message and an exit code."""
    try:
        return int(asyncio.run(run()))
    except InvalidJob as exc:
        err.print(f"[red]invalid job:[/] {exc}")
        return EXIT_INVALID
    except JobFailed as exc:
        err.print(f"[red]failed ({exc.code}):[/] {exc.reason}")
        return EXIT_FAILED
    except JobCancelled as exc:
        err.print(f"[yellow]cancelled:[/] {exc.reason or 'no reason given'}")
        return EXIT_CANCELLED
    except WaitTimeout as exc:
        err.print(f"[yellow]timed out:[/] {exc}")
        return EXIT_TIMEOUT
    except BrokerError as exc:
        err.print(f"[red]broker:[/] {exc}")
        return EXIT_BROKER
