"""The sampling loop: prompt and image in, video frames out, one readable pass.

Owns the order of work for one generation (encode, condition, denoise with guidance,
decode) and its step control. Must never know about jobs, Kafka or storage: callers pass
plain parameters plus `on_progress` / `should_stop` and get a small dataclass back.
"""

from __future__ import annotations

import html
import re
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .caches import CacheControl, applied_cache
from .devices import is_out_of_memory
from .errors import OutOfMemory
from .loading import WanComponents, load_components
from .request import (
    DECODING,
    DEFAULT_NEGATIVE_PROMPT,
    DENOISING,
    ENCODING_PROMPT,
    Generated,
    GenerationRequest,
    Outcome,
    ProgressCallback,
    Solver,
    StopCallback,
    Stopped,
)


def make_scheduler(config: dict[str, Any], solver: Solver, shift: float) -> Any:
    """A fresh flow-matching scheduler per generation (schedulers keep per-run state)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": shift}
    if solver == "unipc":
        return UniPCMultistepScheduler.from_config(config, **flow)
    return DPMSolverMultistepScheduler.from_config(
        config, **flow, algorithm_type="dpmsolver++", solver_order=2
    )


def clean_prompt(text: str) -> str:
    """Fix mojibake and HTML entities and collapse whitespace, as Wan's reference does."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanI2V:
    """A loaded Wan2.1 I2V model that generates one video at a time."""

    def __init__(self, components: WanComponents) -> None:
        self.c = components
        vae_config = components.vae.config
        self.temporal_factor: int = vae_config.scale_factor_temporal
        self.spatial_factor: int = vae_config.scale_factor_spatial
        patch = components.transformer.config.patch_size
        self.spatial_multiple = self.spatial_factor * patch[1]
        self._latents_mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1, 1)
        self._latents_std = torch.tensor(vae_config.latents_std).view(1, -1, 1, 1, 1)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        t5_cpu: bool = False,
    ) -> WanI2V:
        return cls(load_components(path, device=device, dtype=dtype, t5_cpu=t5_cpu))

    def generate(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
    ) -> Outcome:
        """Run one generation; a stop before the end skips decoding and returns `Stopped`."""
        request.check(self.spatial_multiple, self.temporal_factor)
        try:
            with torch.inference_mode():
                return self._generate(request, on_progress, should_stop)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfMemory(
                    f"out of device memory at {request.width}x{request.height}, "
                    f"{request.num_frames} frames; try fewer frames or a smaller size"
                ) from exc
            raise

    def _generate(
        self,
        r: GenerationRequest,
        on_progress: ProgressCallback | None,
        should_stop: StopCallback | None,
    ) -> Outcome:
        c = self.c
        report = on_progress or (lambda phase, step, total: None)
        stop = should_stop or (lambda: False)
        seed = r.seed if r.seed is not None else secrets.randbelow(2**31)
        timings: dict[str, float] = {}

        # 1. Encode the prompt (and the negative prompt when guidance needs it) and the image.
        t0 = time.perf_counter()
        report(ENCODING_PROMPT, 0, 2)
        prompt_embeds = self._encode_text(r.prompt, r.max_sequence_length)
        negative_embeds = (
            self._encode_text(r.negative_prompt or DEFAULT_NEGATIVE_PROMPT, r.max_sequence_length)
            if r.do_guidance
            else None
        )
        image_embeds = self._encode_image(r.image)
        report(ENCODING_PROMPT, 1, 2)

        # 2. Conditioning: the first frame through the VAE, plus a mask saying "keep frame 0".
        condition = self._condition_latents(r)
        report(ENCODING_PROMPT, 2, 2)
        timings[ENCODING_PROMPT] = time.perf_counter() - t0

        # 3. Noise and timesteps.
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

        # 4. Denoise: one transformer pass per branch and step, guidance mixes the two.
        t0 = time.perf_counter()
        transformer = c.transformer
        steps = len(scheduler.timesteps)
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

        with applied_cache(transformer, r.cache, steps) as cache:
            for i, t in enumerate(scheduler.timesteps):
                if stop():
                    timings[DENOISING] = time.perf_counter() - t0
                    return Stopped(step=i, total_steps=steps, seed=seed, timings=timings)
                model_input = torch.cat([latents, condition], dim=1).to(c.dtype)
                timestep = t.expand(latents.shape[0])
                noise = predict(cache, i, "cond", model_input, timestep, prompt_embeds)
                if negative_embeds is not None:
                    uncond = predict(cache, i, "uncond", model_input, timestep, negative_embeds)
                    noise = uncond + r.guidance_scale * (noise - uncond)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
                report(DENOISING, i + 1, steps)
            cached_steps = cache.reused_steps()
        timings[DENOISING] = time.perf_counter() - t0
        if stop():
            return Stopped(step=steps, total_steps=steps, seed=seed, timings=timings)

        # 5. Decode the latents into frames.
        t0 = time.perf_counter()
        report(DECODING, 0, 1)
        frames = self._decode(latents)
        report(DECODING, 1, 1)
        timings[DECODING] = time.perf_counter() - t0
        return Generated(frames=frames, seed=seed, timings=timings, cached_steps=cached_steps)

    # -- the steps, each small -------------------------------------------------------

    def _encode_text(self, text: str, max_length: int) -> torch.Tensor:
        """UMT5 embeddings of the cleaned text, padded with zeros past its real length."""
        c = self.c
        tokens = c.tokenizer(
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
        hidden = c.text_encoder(
            tokens.input_ids.to(c.text_device), mask.to(c.text_device)
        ).last_hidden_state
        embeds = hidden.to(device=c.device, dtype=c.dtype)
        embeds[:, length:] = 0
        return embeds  # type: ignore[no-any-return]

    def _encode_image(self, image: Any) -> torch.Tensor:
        """CLIP's penultimate hidden states of the first frame."""
        c = self.c
        pixels = c.image_processor(images=image, return_tensors="pt").pixel_values
        out = c.image_encoder(pixel_values=pixels.to(c.device), output_hidden_states=True)
        return out.hidden_states[-2].to(c.dtype)  # type: ignore[no-any-return]

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

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        c = self.c
        latents = latents.to(c.vae.dtype)
        mean, std = self._latents_mean.to(latents), self._latents_std.to(latents)
        video = c.vae.decode(latents * std + mean, return_dict=False)[0]  # (1, 3, F, H, W)
        video = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)  # (F, H, W, 3)
        return (video * 255).round().to(torch.uint8).cpu().numpy()  # type: ignore[no-any-return]
