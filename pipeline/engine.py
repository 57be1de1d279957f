"""The sampling loop: prompt and image in, video frames out, one readable pass.

Owns the order of work for one generation (encode, condition, denoise with guidance,
decode) and its step control. Must never know about jobs, Kafka or storage: callers pass
plain parameters plus `on_progress` / `should_stop` and get a small dataclass back.

Over 400 lines on purpose, as diffusers' pipelines are: one linear pass with numbered steps
is easier to check against the reference than the same steps spread over modules; its
helpers (attention, caches, parallel, VAE parallel, video) already live apart.
"""

from __future__ import annotations

import html
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attention import BackendChoice, apply_backend
from .caches import CacheControl, applied_cache
from .compile import DEFAULT_WARMUP_SIZES, CompileReport, Size
from .devices import is_out_of_memory
from .errors import FailedOnRank, OutOfMemory, PipelineError
from .layout import ParallelLayout
from .loading import WanComponents, load_components
from .lora import LoraSpec
from .parallel import CONTINUE, ERROR, STOP, Ranks, RanksOutOfStep, enable_ulysses
from .request import (
    DECODING,
    DEFAULT_NEGATIVE_PROMPT,
    DENOISING,
    ENCODING_PROMPT,
    FramesCallback,
    Generated,
    GenerationRequest,
    Outcome,
    ProgressCallback,
    Solver,
    StopCallback,
    Stopped,
)

log = logging.getLogger(__name__)

NEGATIVE_CACHE_SIZE = 8
"""Negative prompts whose embeddings an engine keeps (a few hundred KiB each at 14B)."""


def make_scheduler(config: dict[str, Any], solver: Solver, shift: float) -> Any:
    """A fresh flow-matching scheduler per generation (schedulers keep per-run state).

    `euler` is for step-distilled weights: deterministic flow-matching Euler whose n steps
    sit at timesteps 1000 * (1 - i / n) before the shift, the schedule such weights are
    trained on (n = 4: 1000, 750, 500, 250, as LightX2V runs its Wan2.1 distill LoRAs)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if solver == "euler":

        class DistilledEuler(FlowMatchEulerDiscreteScheduler):
            def set_timesteps(
                self, num_inference_steps: int | None = None, *args: Any, **kwargs: Any
            ) -> None:
                if num_inference_steps and "sigmas" not in kwargs and "timesteps" not in kwargs:
                    n = num_inference_steps
                    kwargs["sigmas"] = [1.0 - i / n for i in range(n)]
                super().set_timesteps(num_inference_steps, *args, **kwargs)  # type: ignore[misc]

        steps = int(config.get("num_train_timesteps", 1000))
        return DistilledEuler(num_train_timesteps=steps, shift=shift)
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    if solver == "unipc":
        return UniPCMultistepScheduler.from_config(config, **flow)
    return DPMSolverMultistepScheduler.from_config(
        config, **flow, algorithm_type="dpmsolver++", solver_order=2
    )


def encode_prompt(
    tokenizer: Any, encoder: Any, text: str, max_length: int, device: torch.device
) -> torch.Tensor:
    """UMT5 embeddings of the cleaned text, padded to `max_length`, zero past its real length."""
    tokens = tokenizer(
        [clean_prompt(text)],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask
    length = int(mask.gt(0).sum())
    hidden = encoder(tokens.input_ids.to(device), mask.to(device)).last_hidden_state
    hidden[:, length:] = 0
    return hidden  # type: ignore[no-any-return]


def clean_prompt(text: str) -> str:
    """Fix mojibake and HTML entities and collapse whitespace, as Wan's reference does."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanI2V:
    """A loaded Wan2.1 I2V model that generates one video at a time.

    On several ranks every rank builds one `WanI2V` and calls `generate` with the same
    request; they run in lockstep and all return the same outcome (frames on rank 0 at
    least). Each step ends with one agreement: continue, stop, or fail together.
    """

    def __init__(
        self,
        components: WanComponents,
        ranks: Ranks | None = None,
        layout: ParallelLayout | None = None,
    ) -> None:
        self.c = components
        self.ranks = ranks or Ranks(device=components.device)
        self.layout = layout or ParallelLayout()
        self._last_step_s = 0.0
        vae_config = components.vae.config
        self.temporal_factor: int = vae_config.scale_factor_temporal
        self.spatial_factor: int = vae_config.scale_factor_spatial
        patch = components.transformer.config.patch_size
        self.spatial_multiple = self.spatial_factor * patch[1]
        self._latents_mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1, 1)
        self._latents_std = torch.tensor(vae_config.latents_std).view(1, -1, 1, 1, 1)
        enable_ulysses(components.transformer, self.ranks)
        self._negative_cache: dict[tuple[str, int], torch.Tensor] = {}
        self.attention: BackendChoice | None = None
        """The attention backend `load` chose (None: diffusers' process-wide default)."""
        self.compiled: CompileReport | None = None
        """What TORCH_COMPILE made at load (None: the blocks run eagerly)."""

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        t5_cpu: bool = False,
        ranks: Ranks | None = None,
        layout: ParallelLayout | None = None,
        attention_backend: str = "native",
        torch_compile: bool = False,
        warmup_sizes: tuple[Size, ...] = DEFAULT_WARMUP_SIZES,
        loras: tuple[LoraSpec, ...] = (),
    ) -> WanI2V:
        """Load the model; with `ranks`, this rank's part of it as `layout` places it.

        `attention_backend` (ATTENTION_BACKEND) is checked and set on every rank alike
        (BackendUnavailable when it cannot run here); `auto` times the exact ones at the
        largest of `warmup_sizes`. `torch_compile` compiles the blocks after loading (and
        sharding) and warms them at each of `warmup_sizes` (width, height, frames).
        `loras` (MODEL_LORAS) are fused into the transformer as it loads."""
        layout = layout or ParallelLayout(t5_cpu=t5_cpu)
        components = load_components(
            path,
            device=str(ranks.device) if ranks else device,
            dtype=dtype,
            t5_cpu=layout.t5_cpu,
            ranks=ranks,
            layout=layout,
            loras=loras,
        )
        engine = cls(components, ranks, layout)
        engine._speed_up(attention_backend, torch_compile, warmup_sizes)
        return engine

    def _speed_up(self, backend: str, torch_compile: bool, sizes: tuple[Size, ...]) -> None:
        """Set the attention backend, then compile and warm the blocks (every rank alike)."""
        from .compile import compile_blocks, tokens, warm_up

        largest = max(sizes, key=lambda size: tokens(self, size), default=DEFAULT_WARMUP_SIZES[0])
        self.attention = apply_backend(
            self.c.transformer, backend, self.ranks, seq_len=tokens(self, largest)
        )
        log.info("attention backend: %s", self.attention.describe())
        if torch_compile:
            compile_blocks(self.c.transformer)
            self.compiled = warm_up(self, sizes)

    def generate(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
        on_frames: FramesCallback | None = None,
    ) -> Outcome:
        """Run one generation; a stop before the end skips decoding and returns `Stopped`.

        `on_frames` (rank 0) receives the frames as the decoder makes them, uint8
        (f, H, W, 3) in order, so they can be encoded while the rest is decoded; the
        outcome still carries all of them."""
        request.check(self.spatial_multiple, self.temporal_factor)
        # Sharded weights are gathered into tensors that must outlive inference mode.
        mode = torch.no_grad() if self.ranks.distributed else torch.inference_mode()
        with mode:
            return self._generate(request, on_progress, should_stop, on_frames)

    def _agree(self, stop: StopCallback, error: BaseException | None, r: GenerationRequest) -> int:
        """Every rank's verdict on the step just done: CONTINUE, STOP, or raise the error
        one of them hit (the same error on every rank)."""
        local = ERROR if error is not None else (STOP if stop() else CONTINUE)
        # A failed rank waits a bounded time: the others may be stuck in a collective it
        # will never join, and then the engine must be restarted (RanksOutOfStep).
        timeout = 5.0 + 2 * self._last_step_s if error is not None else None
        mine = _describe(_as_pipeline_error(error, r)) if error is not None else None
        try:
            status = self.ranks.agree(local, timeout)
        except RanksOutOfStep as exc:
            exc.failure = mine
            raise
        if status != ERROR:
            return status
        if not self.ranks.distributed and error is not None:
            raise _as_pipeline_error(error, r) from error
        reports = self.ranks.gather_objects(mine)
        rank, (code, message, retryable) = next(
            (rank, report) for rank, report in enumerate(reports) if report is not None
        )
        raise FailedOnRank(rank, code, message, retryable) from error

    def _generate(
        self,
        r: GenerationRequest,
        on_progress: ProgressCallback | None,
        should_stop: StopCallback | None,
        on_frames: FramesCallback | None = None,
    ) -> Outcome:
        c, ranks = self.c, self.ranks
        report = on_progress or (lambda phase, step, total: None)
        stop = should_stop or (lambda: False)
        seed = r.seed if r.seed is not None else secrets.randbelow(2**31)
        seed = ranks.broadcast_object(seed)  # every rank draws the same noise
        timings: dict[str, float] = {}

        # 1. Encode the prompt (and the negative prompt when guidance needs it) and the image,
        #    and the first frame through the VAE, plus a mask saying "keep frame 0".
        t0 = time.perf_counter()
        report(ENCODING_PROMPT, 0, 2)
        encoded: Any = None
        error: BaseException | None = None
        try:
            encoded = self._encode(r, report)
        except Exception as exc:
            error = exc
        if self._agree(stop, error, r) == STOP:
            return Stopped(step=0, total_steps=r.infer_steps, seed=seed, timings=timings)
        prompt_embeds, negative_embeds, image_embeds, condition = encoded
        report(ENCODING_PROMPT, 2, 2)
        timings[ENCODING_PROMPT] = time.perf_counter() - t0

        # 2. Noise and timesteps.
        scheduler = make_scheduler(c.scheduler_config, r.solver, r.shift)
        scheduler.set_timesteps(r.infer_steps, device=c.device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latent_frames = (r.num_frames - 1) // self.temporal_factor + 1
        shape = (
            1,
            c.vae.config.z_dim,
            latent_frames,
            r.height // self.spatial_factor,
            r.width // self.spatial_factor,
        )
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(c.device)

        # 3. Denoise: one transformer pass per branch and step, guidance mixes the two.
        #    With CFG_SIZE=2 each half of the ranks runs one branch and they swap results.
        t0 = time.perf_counter()
        transformer = c.transformer
        steps = len(scheduler.timesteps)
        split_branches = ranks.cfg_size == 2 and negative_embeds is not None
        report(DENOISING, 0, steps)

        def predict(
            cache: CacheControl,
            step: int,
            branch: str,
            x: torch.Tensor,
            timestep: torch.Tensor,
            text: torch.Tensor,
        ) -> torch.Tensor:
            """One transformer pass for one guidance branch ("cond" or "uncond")."""
            cache.at(step, branch)
            with transformer.cache_context(branch):
                return transformer(  # type: ignore[no-any-return]
                    hidden_states=x,
                    timestep=timestep,
                    encoder_hidden_states=text,
                    encoder_hidden_states_image=image_embeds,
                    return_dict=False,
                )[0]

        def denoise_step(cache: CacheControl, i: int, t: torch.Tensor) -> torch.Tensor:
            model_input = torch.cat([latents, condition], dim=1).to(c.dtype)
            timestep = t.expand(latents.shape[0])
            if split_branches:
                mine = ("cond", prompt_embeds) if ranks.branch == 0 else ("uncond", negative_embeds)
                noise = predict(cache, i, mine[0], model_input, timestep, mine[1])
                cond, uncond = ranks.exchange_branches(noise)
                noise = uncond + r.guidance_scale * (cond - uncond)
            else:
                noise = predict(cache, i, "cond", model_input, timestep, prompt_embeds)
                if negative_embeds is not None:
                    uncond = predict(cache, i, "uncond", model_input, timestep, negative_embeds)
                    noise = uncond + r.guidance_scale * (noise - uncond)
            return scheduler.step(noise, t, latents, return_dict=False)[0]  # type: ignore[no-any-return]

        with applied_cache(transformer, r.cache, steps, ranks) as cache:
            for i, t in enumerate(scheduler.timesteps):
                # Step 0 follows the encoding's agreement; later steps agree on the last one.
                if i > 0 and self._agree(stop, error, r) == STOP:
                    timings[DENOISING] = time.perf_counter() - t0
                    return Stopped(step=i, total_steps=steps, seed=seed, timings=timings)
                t_step = time.perf_counter()
                try:
                    latents = denoise_step(cache, i, t)
                    report(DENOISING, i + 1, steps)
                except Exception as exc:
                    error = exc
                self._last_step_s = time.perf_counter() - t_step
            cached_steps = cache.reused_steps()
        if self._agree(stop, error, r) == STOP:
            timings[DENOISING] = time.perf_counter() - t0
            return Stopped(step=steps, total_steps=steps, seed=seed, timings=timings)
        timings[DENOISING] = time.perf_counter() - t0

        # 4. Decode the latents into frames (split across the ranks with VAE_PARALLEL).
        t0 = time.perf_counter()
        report(DECODING, 0, 1)
        frames: Any = None
        try:
            frames = self._decode(latents, on_frames)
        except Exception as exc:
            error = exc
        self._agree(lambda: False, error, r)
        report(DECODING, 1, 1)
        timings[DECODING] = time.perf_counter() - t0
        return Generated(frames=frames, seed=seed, timings=timings, cached_steps=cached_steps)

    def _encode(self, r: GenerationRequest, report: ProgressCallback) -> tuple[Any, ...]:
        prompt_embeds = self._encode_text(r.prompt, r.max_sequence_length)
        negative_embeds = (
            self._encode_negative(
                r.negative_prompt or DEFAULT_NEGATIVE_PROMPT, r.max_sequence_length
            )
            if r.do_guidance
            else None
        )
        image_embeds = self._encode_image(r.image)
        report(ENCODING_PROMPT, 1, 2)
        return prompt_embeds, negative_embeds, image_embeds, self._condition(r)

    # -- the steps, each small -------------------------------------------------------

    def _encode_negative(self, text: str, max_length: int) -> torch.Tensor:
        """The negative prompt's embeddings, kept across jobs: most jobs share one (the
        default), and on a CPU text encoder it costs seconds. Every rank keeps the same
        entries, so all of them hit or miss together (a miss may broadcast)."""
        key = (text, max_length)
        embeds = self._negative_cache.pop(key, None)
        if embeds is None:
            embeds = self._encode_text(text, max_length)
        self._negative_cache[key] = embeds  # most recent last
        while len(self._negative_cache) > NEGATIVE_CACHE_SIZE:
            self._negative_cache.pop(next(iter(self._negative_cache)))
        return embeds

    def _encode_text(self, text: str, max_length: int) -> torch.Tensor:
        """UMT5 embeddings of the cleaned text, padded with zeros past its real length.
        With T5_CPU only rank 0 has the encoder: it encodes and the others receive."""
        c = self.c
        if self.layout.t5_cpu and self.ranks.distributed:
            if c.text_encoder is None:
                dim = c.transformer.config.text_dim
                embeds = torch.empty(1, max_length, dim, dtype=c.dtype, device=c.device)
            else:
                embeds = self._run_text_encoder(text, max_length)
            return self.ranks.broadcast(embeds)
        return self._run_text_encoder(text, max_length)

    def _run_text_encoder(self, text: str, max_length: int) -> torch.Tensor:
        c = self.c
        embeds = encode_prompt(c.tokenizer, c.text_encoder, text, max_length, c.text_device)
        return embeds.to(device=c.device, dtype=c.dtype)

    def _encode_image(self, image: Any) -> torch.Tensor:
        """CLIP's penultimate hidden states of the first frame."""
        c = self.c
        pixels = c.image_processor(images=image, return_tensors="pt").pixel_values
        out = c.image_encoder(pixel_values=pixels.to(c.device), output_hidden_states=True)
        return out.hidden_states[-2].to(c.dtype)  # type: ignore[no-any-return]

    def _condition(self, r: GenerationRequest) -> torch.Tensor:
        """The condition latents, VAE-encoded on rank 0 alone and broadcast to the others:
        the encode covers every frame of the video (the first given, the rest black), so
        the other ranks save its time and memory."""
        ranks = self.ranks
        if not ranks.distributed:
            return self._condition_latents(r)
        if ranks.rank == 0:
            condition = self._condition_latents(r).contiguous()
        else:
            c = self.c
            frames = (r.num_frames - 1) // self.temporal_factor + 1
            shape = (
                1,
                self.temporal_factor + c.vae.config.z_dim,
                frames,
                r.height // self.spatial_factor,
                r.width // self.spatial_factor,
            )
            condition = torch.empty(shape, dtype=torch.float32, device=c.device)
        return ranks.broadcast(condition)

    def _condition_latents(self, r: GenerationRequest) -> torch.Tensor:
        """VAE latents of [image, black, black, ...] with a 4-channel "frame is given" mask."""
        c = self.c
        pixels = torch.from_numpy(np.asarray(r.image, dtype=np.float32) / 255.0)
        first = (pixels.permute(2, 0, 1) * 2.0 - 1.0).unsqueeze(0).to(c.device)  # (1, 3, H, W)
        video = torch.cat(
            [first.unsqueeze(2), first.new_zeros(1, 3, r.num_frames - 1, r.height, r.width)],
            dim=2,
        )
        latent = c.vae.encode(video.to(c.vae.dtype)).latent_dist.mode().to(torch.float32)
        mean, std = self._latents_mean.to(latent), self._latents_std.to(latent)
        latent = (latent - mean) / std

        h, w = latent.shape[-2:]
        mask = torch.zeros(1, 1, r.num_frames, h, w, device=c.device)
        mask[:, :, 0] = 1
        # The VAE folds 4 frames into each latent frame (the first alone): fold the mask too.
        mask = torch.cat(
            [mask[:, :, :1].repeat_interleave(self.temporal_factor, dim=2), mask[:, :, 1:]], dim=2
        )
        mask = mask.view(1, -1, self.temporal_factor, h, w).transpose(1, 2)
        return torch.cat([mask, latent], dim=1)

    def _decode(
        self, latents: torch.Tensor, on_frames: FramesCallback | None = None
    ) -> np.ndarray | None:
        """Frames on rank 0 (and every rank with VAE_PARALLEL); None on the others. They
        come from the decoder a latent frame at a time; rank 0 hands each to `on_frames`."""
        from . import vae_parallel

        c, ranks = self.c, self.ranks
        split = self.layout.vae_parallel and ranks.distributed
        if ranks.rank != 0 and not split:
            return None
        latents = latents.to(c.vae.dtype)
        mean, std = self._latents_mean.to(latents), self._latents_std.to(latents)
        group = torch.distributed.group.WORLD if split else None
        chunks = []
        for video in vae_parallel.decode_chunks(c.vae, latents * std + mean, group):
            # (1, 3, f, H, W) in [-1, 1] -> (f, H, W, 3) uint8, element by element.
            video = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
            part = (video * 255).round().to(torch.uint8).cpu().numpy()
            if on_frames is not None and ranks.rank == 0:
                on_frames(part)
            chunks.append(part)
        return np.concatenate(chunks)


def _as_pipeline_error(exc: BaseException, r: GenerationRequest) -> BaseException:
    """Out-of-memory of any backend as our OutOfMemory; anything else unchanged."""
    if is_out_of_memory(exc) and not isinstance(exc, PipelineError):
        return OutOfMemory(
            f"out of device memory at {r.width}x{r.height}, {r.num_frames} frames; "
            "try fewer frames or a smaller size"
        )
    return exc


def _describe(exc: BaseException) -> tuple[str, str, bool]:
    """(code, message, retryable) of an error, to tell the other ranks."""
    if isinstance(exc, PipelineError):
        return exc.code, str(exc), exc.retryable
    return "internal", f"engine error: {type(exc).__name__}: {exc}", True
