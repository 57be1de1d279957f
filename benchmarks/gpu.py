"""The one GPU command: what the engine's speed options give on this card, in one run.

Builds every part of Wan2.1-I2V-14B-720P (DiT, UMT5-XXL, CLIP ViT-H/14, Wan VAE) with
random weights directly on the device (nothing is downloaded), then measures, in order:

1. attention alone at the 720p sequence (75,600 tokens, 40 heads of 128) for every
   attention backend this node can run (`pipeline.attention.available_backends`);
2. one DiT forward at 1280x720x81 per configuration: native eager, the fastest exact
   backend eager, the same compiled (`TORCH_COMPILE`'s per-block compile), and compiled
   with FP8 weights and activations (torchao, when installed and the card has FP8):
   seconds, TFLOP/s against the card's dense bf16 peak, peak memory;
3. one engine job (`WanI2V.generate`, the product's loop) at 1280x720x81 with 4 steps and
   guidance: per-step time, VAE decode, MP4 encode (overlapped), peak memory;
4. one turbo job (4 steps, guidance 1, euler): the distilled mode's time on this card;
5. the projected 8-card, 40-step job from the one-card step time and the Ulysses
   all-to-all volume per step computed from the shapes (link bandwidth stated).

Sections that would pass `--budget-s` (default 520 s) are skipped and say so, so the whole
run fits a 9-minute device slot. Output: a plain-text report on stdout (and `--out`).

    python benchmarks/gpu.py --out benchmarks/results/gpu_$(hostname).txt
    python benchmarks/gpu.py --tiny      # the same code on the CPU with toy sizes (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dit_gpu import FULL_CONFIG, IMAGE_TOKENS, PEAK_TFLOPS, TEXT_TOKENS, count_flops

from i2v_fleet.pipeline import Generated, GenerationRequest, WanI2V
from i2v_fleet.pipeline.attention import available_backends, time_backend
from i2v_fleet.pipeline.loading import WanComponents

TINY = {
    "dit": dict(
        FULL_CONFIG, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32,
        ffn_dim=64, num_layers=2, image_dim=16, added_kv_proj_dim=32,
    ),
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "clip": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=8, projection_dim=16),
    "vae": dict(base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    "size": (96, 64, 9),
}  # fmt: skip
FULL = {
    "dit": FULL_CONFIG,
    # UMT5-XXL as Wan2.1 uses it (text_encoder/config.json of the Diffusers checkpoint).
    "t5": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    # CLIP ViT-H/14 (image_encoder/config.json).
    "clip": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024),
    "vae": {},  # AutoencoderKLWan's defaults are Wan2.1's VAE
    "size": (1280, 720, 81),
}  # fmt: skip
LINK_GBPS = 450.0
"""Per-GPU all-to-all bandwidth assumed for the projection (NVLink 4 via NVSwitch: 900 GB/s
bidirectional per H100, taken as 450 GB/s each way)."""


class Report:
    def __init__(self, budget_s: float) -> None:
        self.lines: list[str] = []
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def _random(factory: Callable[[], torch.nn.Module], device: torch.device, dtype: Any) -> Any:
    """Build a module straight on `device` in `dtype` (no host copy, default init)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            module = factory()
    finally:
        torch.set_default_dtype(previous)
    return module.eval()


def build_components(sizes: dict[str, Any], device: torch.device) -> WanComponents:
    """Every part of the model with random weights, placed as the loader places them."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    from i2v_fleet.pipeline.tiny import build_tokenizer

    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    tokenizer = build_tokenizer()
    t5 = UMT5Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, **sizes["t5"],
    )  # fmt: skip
    transformer = _random(lambda: WanTransformer3DModel(**sizes["dit"]), device, dtype)
    for name, param in transformer.named_parameters():  # as from_pretrained keeps them
        if any(m in name.split(".") for m in transformer._keep_in_fp32_modules):
            param.data = param.data.float()
    clip = CLIPVisionConfig(**sizes["clip"])
    image_size = clip.image_size
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=5.0,
    )  # fmt: skip
    return WanComponents(
        tokenizer=tokenizer,
        text_encoder=_random(lambda: UMT5EncoderModel(t5), device, dtype),
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        image_encoder=_random(lambda: CLIPVisionModel(clip), device, torch.float32),
        vae=_random(lambda: AutoencoderKLWan(z_dim=16, **sizes["vae"]), device, torch.float32),
        transformer=transformer,
        scheduler_config=dict(scheduler.config),
        device=device,
        dtype=dtype,
        text_device=device,
        path=Path("random-weights"),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _peak(device: torch.device) -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def _dit_inputs(cfg: dict[str, Any], size: tuple[int, int, int], device: torch.device,
                dtype: Any) -> dict[str, torch.Tensor]:  # fmt: skip
    width, height, frames = size
    latent = (1, 36, (frames - 1) // 4 + 1, height // 8, width // 8)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return {
        "hidden_states": randn(*latent),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": randn(1, TEXT_TOKENS, cfg["text_dim"]),
        "encoder_hidden_states_image": randn(1, IMAGE_TOKENS, cfg["image_dim"]),
    }


def _forward_s(model: Any, inputs: dict[str, torch.Tensor], iters: int,
               device: torch.device) -> tuple[float, float]:  # fmt: skip
    """(first call s, best of `iters` after it)."""
    times = []
    with torch.inference_mode():
        for _ in range(iters + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times[0], min(times[1:])


def _fp8(model: Any, device: torch.device) -> str | None:
    """Quantize the blocks' linears to FP8 (torchao); None when done, else why not."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "the device has no FP8 (needs CUDA compute capability 8.9+)"
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError:
        return "torchao is not installed"
    quantize_(
        model,
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("blocks."),
    )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test)")
    parser.add_argument("--iters", type=int, default=1, help="timed forwards after the first")
    parser.add_argument("--budget-s", type=float, default=520.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = TINY if args.tiny else FULL
    device = torch.device("cpu" if args.tiny else "cuda")
    report = Report(args.budget_s)
    say = report.say
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    peak = next((p for key, p in PEAK_TFLOPS if key in name), None)
    import diffusers

    say(f"# gpu.py on {name} ({platform.node()}), torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}")  # fmt: skip
    say(f"# dense bf16 peak: {peak or 'unknown'} TFLOP/s; budget {args.budget_s:.0f} s")

    t0 = time.perf_counter()
    components = build_components(sizes, device)
    cfg = sizes["dit"]
    width, height, frames = sizes["size"]
    say(f"built random components in {time.perf_counter() - t0:.1f} s")
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    flops, _ = count_flops(cfg, 1, tokens)
    dtype = components.dtype

    # 1. attention alone
    say()
    say(f"## attention alone: (1, {tokens}, {heads}, {head_dim}) {dtype}")
    backends = available_backends(device, dtype, head_dim)
    timings: dict[str, float] = {}
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype) for _ in "qkv")
    for backend in backends:
        if backend in ("_native_math", "flex") and not args.tiny:
            say(f"{backend:<16} skipped (materialises the attention matrix / unfused)")
            continue
        timings[backend] = time_backend(backend, q, k, v, calls=3)
        attn_flops = 4 * tokens * tokens * heads * head_dim
        rate = attn_flops / timings[backend] / 1e12
        say(f"{backend:<16} {timings[backend] * 1e3:9.1f} ms  {rate:8.1f} TFLOP/s")
    del q, k, v
    best = min(timings, key=timings.__getitem__)
    say(f"fastest exact: {best}")

    # 2. one DiT forward per configuration
    say()
    say(f"## DiT forward at {width}x{height}x{frames}: {flops / 1e15:.3f} PFLOP")
    model = components.transformer
    inputs = _dit_inputs(cfg, sizes["size"], device, dtype)
    rows: list[tuple[str, float, float, float | None]] = []
    configs = [("native", False, False), (best, False, False), (best, True, False)]
    compiled = False

    def forward(backend: str, compile_: bool, fp8: bool) -> None:
        nonlocal compiled
        precision = "fp8" if fp8 else str(dtype).removeprefix("torch.")
        label = f"{backend} {'compiled' if compile_ else 'eager'} {precision}"
        if report.left() < 60:
            say(f"{label:<34} skipped: budget")
            return
        if fp8:
            why = _fp8(model, device)
            if why is not None:
                say(f"{label:<34} skipped: {why}")
                return
        model.set_attention_backend(backend)
        if compile_ and not compiled:
            from i2v_fleet.pipeline.compile import compile_blocks

            compile_blocks(model)
            compiled = True
        with _peak(device) as mem:
            first, seconds = _forward_s(model, inputs, args.iters, device)
        rate = flops / seconds / 1e12
        share = f"{100 * rate / peak:5.1f} %" if peak else "  -"
        say(f"{label:<34} {seconds:8.2f} s  {rate:7.1f} TFLOP/s  {share} of peak  "
            f"first call {first:.1f} s  peak {mem.get('peak_gib', 0):.1f} GiB")  # fmt: skip
        rows.append((label, seconds, rate, mem.get("peak_gib")))

    for backend, compile_, fp8 in configs:
        forward(backend, compile_, fp8)

    # 3-4. engine jobs through the product's loop (compiled, fastest exact backend, bf16)
    engine = WanI2V(components)
    model.set_attention_backend(best)
    image = _picture(width, height)
    step_s: dict[str, float] = {}
    for label, fields in (
        ("job: 4 steps, guidance 5.0, unipc", {"infer_steps": 4, "guidance_scale": 5.0}),
        ("turbo: 4 steps, guidance 1.0, euler",
         {"infer_steps": 4, "guidance_scale": 1.0, "solver": "euler"}),
    ):  # fmt: skip
        say()
        say(f"## {label} at {width}x{height}x{frames}")
        if report.left() < 90:
            say("skipped: budget")
            continue
        step_s[label] = _job(engine, image, sizes["size"], fields, device, say)

    # FP8 last: quantizing changes the weights for good.
    say()
    forward(best, True, True)
    gc.collect()

    # 5. projection to 8 cards and 40 steps
    say()
    say("## projected 8-card job, 40 steps with guidance (Ulysses 8)")
    one_card = step_s.get("job: 4 steps, guidance 5.0, unipc")
    if one_card is None:
        say("no one-card step time measured")
    else:
        dim = heads * head_dim
        # Ulysses per self-attention: q, k, v to head shards and the output back, each
        # moving (n-1)/n of this rank's tokens x dim.
        bytes_per_step = 2 * cfg["num_layers"] * 4 * (tokens / 8) * dim * 2 * 7 / 8
        comm = bytes_per_step / (LINK_GBPS * 1e9)
        per_step = one_card / 8 + comm
        say(f"one-card step {one_card:.2f} s (cond + uncond) / 8 ranks + all-to-all "
            f"{bytes_per_step / 1e9:.1f} GB per rank per step at {LINK_GBPS:.0f} GB/s "
            f"({comm * 1e3:.0f} ms) = {per_step:.2f} s/step; 40 steps = {40 * per_step:.0f} s "
            "plus encode and decode (split across ranks with VAE_PARALLEL)")  # fmt: skip
    say()
    say(f"# total {time.perf_counter() - report.start:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report.lines) + "\n")


def _picture(width: int, height: int) -> Any:
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _job(engine: WanI2V, image: Any, size: tuple[int, int, int], fields: dict[str, Any],
         device: torch.device, say: Callable[[str], None]) -> float:  # fmt: skip
    """One generation plus the overlapped MP4 encode; returns seconds per step."""
    from i2v_fleet.pipeline.video import BackgroundMp4

    width, height, frames = size
    request = GenerationRequest(
        image=image, prompt="a cat walks along a sunlit windowsill", width=width,
        height=height, num_frames=frames, seed=1, **fields,
    )  # fmt: skip
    steps: list[float] = []

    def on_progress(phase: str, step: int, total: int) -> None:
        if phase == "denoising":
            _sync(device)
            steps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp, _peak(device) as mem:
        mp4 = BackgroundMp4(Path(tmp) / "video.mp4", 16)
        t0 = time.perf_counter()
        outcome = engine.generate(request, on_progress=on_progress, on_frames=mp4.submit)
        t1 = time.perf_counter()
        info = mp4.finish()
        t2 = time.perf_counter()
    assert isinstance(outcome, Generated)
    per_step = float(np.median(np.diff(steps))) if len(steps) > 1 else float("nan")
    timings = outcome.timings
    say(f"per step {per_step:.2f} s; encoding prompt {timings.get('encoding_prompt', 0):.1f} s;"
        f" denoising {timings.get('denoising', 0):.1f} s; decoding {timings.get('decoding', 0):.1f}"
        f" s; MP4 tail after decode {t2 - t1:.2f} s ({info.num_frames} frames); "
        f"job {t2 - t0:.1f} s; peak {mem.get('peak_gib', 0):.1f} GiB")  # fmt: skip
    return per_step


if __name__ == "__main__":
    main()
