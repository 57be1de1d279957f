"""`i2v generate`: run one job on this machine exactly as a worker would, without Kafka.

Owns the command line of local generation: validate the job, prepare the image, run the
engine with a progress bar, write the MP4 and its poster. Imports torch only when run.
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def generate(
    image: Annotated[Path, typer.Argument(help="First frame: a JPEG, PNG or WebP file.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What should happen.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="MP4 to write.")] = Path(
        "video.mp4"
    ),
    model_dir: Annotated[
        Path, typer.Option("--model-dir", envvar="MODEL_CKPT_DIR", help="[env: MODEL_CKPT_DIR]")
    ] = Path("/data/models/modelscope/hub/Wan-AI/Wan2.1-I2V-14B-720P"),
    size: Annotated[str, typer.Option(help="width*height, one of the job sizes.")] = "832*480",
    frames: Annotated[int, typer.Option(help="4n+1 frames.")] = 41,
    preset: Annotated[str, typer.Option(help="fast, balanced, high or custom.")] = "fast",
    steps: Annotated[int | None, typer.Option(help="Override the preset's steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Override the preset's cfg.")] = None,
    solver: Annotated[str | None, typer.Option(help="unipc or dpm++.")] = None,
    shift: Annotated[float | None, typer.Option(help="Flow shift (default 5.0).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible video.")] = None,
    cache: Annotated[str | None, typer.Option(help="attention, first_block or none.")] = None,
    negative_prompt: Annotated[str, typer.Option(help="What to avoid.")] = "",
    fps: Annotated[int, typer.Option(help="Frame rate of the MP4.")] = 16,
    device: Annotated[str | None, typer.Option(help="cuda, npu or cpu [default: detect].")] = None,
    t5_cpu: Annotated[bool, typer.Option(envvar="T5_CPU", help="Text encoder on the CPU.")] = False,
) -> None:
    """Generate one video locally: the same validation and engine as a worker node."""
    from i2v_fleet.pipeline.cli import require_worker_extra

    require_worker_extra("i2v generate")
    from pydantic import ValidationError

    from i2v_fleet.pipeline import (
        Generated,
        PipelineError,
        WanI2V,
        encode_mp4,
        prepare_image,
        write_poster,
    )
    from i2v_fleet.schemas import JobRequest, describe_validation_error

    from .generation import generation_request

    fields: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "image_size": size,
        "num_frames": frames,
        "quality_preset": preset,
        "infer_steps": steps,
        "guidance_scale": guidance,
        "sample_solver": solver,
        "sample_shift": shift,
        "seed": seed,
        "fps": fps,
        "cache": {"kind": cache} if cache else None,
    }
    try:
        data = image.read_bytes()
        probe = JobRequest.model_validate({**fields, "image": {"url": "https://local.invalid/x"}})
        prepared = prepare_image(data, probe.image_size.width, probe.image_size.height)
        job = _with_inline_image(fields, prepared)
    except ValidationError as exc:
        err.print(f"[red]invalid job:[/] {describe_validation_error(exc)}")
        raise typer.Exit(2) from None
    except (OSError, PipelineError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None

    sampling = job.sampling()
    err.print(
        f"{job.image_size} x {job.num_frames} frames, {sampling.infer_steps} steps "
        f"({sampling.sample_solver}, cfg {sampling.guidance_scale}, shift "
        f"{sampling.sample_shift}), model {model_dir}"
    )
    t0 = time.perf_counter()
    try:
        engine = WanI2V.load(model_dir, device=device, t5_cpu=t5_cpu)
        err.print(f"model loaded in {time.perf_counter() - t0:.1f} s")
        with _progress() as bar:
            task = bar.add_task("starting", total=None)

            def on_progress(phase: str, step: int, total: int) -> None:
                bar.update(task, description=phase, completed=step, total=total or None)

            outcome = engine.generate(generation_request(job, prepared), on_progress=on_progress)
        assert isinstance(outcome, Generated)
        info = encode_mp4(outcome.frames, out_path, fps=job.fps)
        poster = out_path.with_suffix(".jpg")
        write_poster(outcome.frames[0], poster)
    except PipelineError as exc:
        err.print(f"[red]{exc.code}:[/] {exc}")
        raise typer.Exit(1) from None
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in outcome.timings.items())
    err.print(f"done in {time.perf_counter() - t0:.1f} s ({timings}); seed {outcome.seed}")
    out.print(
        f"{out_path}  {info.width}x{info.height}, {info.num_frames} frames at {info.fps} fps, "
        f"{info.codec}/{info.pix_fmt}, {info.size_bytes} bytes; poster {poster}"
    )


def _with_inline_image(fields: dict[str, Any], prepared: Any) -> Any:
    from i2v_fleet.schemas import JobRequest

    buffer = io.BytesIO()
    prepared.save(buffer, format="JPEG", quality=95)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return JobRequest.model_validate({**fields, "image": {"base64": encoded}})


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


def worker() -> None:
    """Run a worker node: claim jobs from Kafka, generate, store in MinIO, report events.

    Configured by environment variables (MODEL_CKPT_DIR, KAFKA_BOOTSTRAP_SERVERS, MINIO_*,
    NODE_ID, ...); `i2v dev up` prints the ones for the local stack.
    """
    from i2v_fleet.pipeline.cli import require_worker_extra

    require_worker_extra("i2v worker")
    from pydantic import ValidationError

    from . import logs
    from .settings import WorkerSettings
    from .worker import serve

    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        err.print(f"[red]invalid worker settings:[/] {exc}")
        raise typer.Exit(2) from None
    logs.configure(settings.node_id)
    import asyncio

    from i2v_fleet.pipeline.layout import LayoutError

    from .engine import EngineMisconfigured

    try:
        asyncio.run(serve(settings))
    except LayoutError as exc:
        err.print(f"[red]invalid layout:[/] {exc}")
        raise typer.Exit(2) from None
    except EngineMisconfigured as exc:
        from rich.markup import escape

        err.print(f"[red]the engine cannot start with these settings:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
