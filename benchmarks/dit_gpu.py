"""Throughput of one Wan2.1-I2V-14B DiT forward at 1280x720, 81 frames, per attention backend.

Builds the full-size ``diffusers.WanTransformer3DModel`` (config of
Wan-AI/Wan2.1-I2V-14B-720P-Diffusers) with random bf16 weights directly on the GPU, feeds it the
shapes of a real job (latent 1x36x21x90x160 -> 75,600 video tokens, 512 text tokens, 257 CLIP
image tokens) and times one denoising forward pass. FLOPs are counted analytically (formula is
printed), so the report gives seconds/forward, achieved TFLOP/s, the fraction of the card's dense
bf16 peak and peak memory, once per attention backend that PyTorch/diffusers can run there.

Standalone on purpose (torch + diffusers only, no weights, no network), so it runs on a bare box:

    python benchmarks/dit_gpu.py --out benchmarks/results/dit_gpu_$(hostname).txt
    python benchmarks/dit_gpu.py --backends sdpa,sdpa:flash --iters 5
    python benchmarks/dit_gpu.py --tiny      # CPU smoke test with a toy config

At full size one forward is ~6.5 PFLOP (72% of it self-attention), i.e. several seconds on an
H100, and each backend runs 1 warm-up + --iters forwards; MATH/flex are skipped up front.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import socket
import sys
import time
from datetime import datetime, timezone

import diffusers
import torch
from diffusers import WanTransformer3DModel, attention_backend
from torch.nn.attention import SDPBackend, sdpa_kernel

# transformer/config.json of Wan-AI/Wan2.1-I2V-14B-720P-Diffusers.
FULL_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280,
    added_kv_proj_dim=5120, rope_max_seq_len=1024,
)  # fmt: skip
# Same architecture, toy sizes; added_kv_proj_dim must equal heads*head_dim (image tokens are
# projected to the model dim before add_k_proj/add_v_proj see them).
TINY_CONFIG = dict(
    FULL_CONFIG, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32,
    ffn_dim=64, num_layers=2, image_dim=16, added_kv_proj_dim=32,
)  # fmt: skip
# WanAttnProcessor hard-codes 512 text tokens when it splits the concatenated [image; text]
# context, so even --tiny must use 512. 257 = CLIP ViT-H/14 penultimate layer (256 patches + CLS).
TEXT_TOKENS, IMAGE_TOKENS = 512, 257
# Dense bf16 tensor-core peak (no sparsity), TFLOP/s; first substring of the device name wins.
PEAK_TFLOPS = [
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),  # remaining H100s are SXM
    ("H200", 989.4), ("A100", 312.0),
]  # fmt: skip
# key -> (kind, arg, CUDA-only, bytes per score element if it materialises the N x N matrix).
BACKENDS = {
    "sdpa": ("sdpa", None, False, None),  # PyTorch's own choice = diffusers default "native"
    "sdpa:flash": ("sdpa", SDPBackend.FLASH_ATTENTION, False, None),
    "sdpa:efficient": ("sdpa", SDPBackend.EFFICIENT_ATTENTION, True, None),
    "sdpa:cudnn": ("sdpa", SDPBackend.CUDNN_ATTENTION, True, None),
    "sdpa:math": ("sdpa", SDPBackend.MATH, False, 2),
    "diffusers:_native_flash": ("diffusers", "_native_flash", False, None),
    "diffusers:_native_efficient": ("diffusers", "_native_efficient", True, None),
    "diffusers:_native_cudnn": ("diffusers", "_native_cudnn", True, None),
    "diffusers:_native_math": ("diffusers", "_native_math", False, 2),
    # Eager (uncompiled) flex_attention falls back to an fp32 dense implementation.
    "diffusers:flex": ("diffusers", "flex", False, 4),
    # Need flash-attn / FA3 / sageattention / xformers; reported as skipped when not installed.
    "diffusers:flash": ("diffusers", "flash", True, None),
    "diffusers:_flash_3": ("diffusers", "_flash_3", True, None),
    "diffusers:sage": ("diffusers", "sage", True, None),
    "diffusers:xformers": ("diffusers", "xformers", True, None),
}
GB = 1e9


def log(*parts: object) -> None:
    """Print and append to --out immediately, so a run killed halfway still leaves its numbers."""
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    if log.file is not None:
        log.file.write(line + "\n")
        log.file.flush()


log.file = None


def count_flops(cfg: dict, b: int, n: int) -> tuple[int, list[tuple[str, str, int]]]:
    """Matmul FLOPs (2 per multiply-add) of one forward; elementwise ops (norms, RoPE, GELU,
    modulation, softmax) are ignored. Mirrors WanTransformerBlock / WanAttnProcessor in 0.42.1:
    cross-attention runs two separate SDPA calls (text, image) with the same query and sums them."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, dkv, lt, li = cfg["ffn_dim"], cfg["added_kv_proj_dim"], TEXT_TOKENS, IMAGE_TOKENS
    patch = cfg["patch_size"][0] * cfg["patch_size"][1] * cfg["patch_size"][2]
    per_block = [
        ("self-attn q/k/v/o proj", "4·2·N·d²", 4 * 2 * n * d * d),
        ("self-attn QKᵀ + PV", "2·2·N²·d", 2 * 2 * n * n * d),
        ("cross-attn q/o proj", "2·2·N·d²", 2 * 2 * n * d * d),
        ("cross-attn text k/v proj", "2·2·Lt·d²", 2 * 2 * lt * d * d),
        ("cross-attn image k/v proj", "2·2·Li·dkv·d", 2 * 2 * li * dkv * d),
        ("cross-attn QKᵀ + PV", "2·2·N·(Lt+Li)·d", 2 * 2 * n * (lt + li) * d),
        ("FFN", "2·2·N·d·F", 2 * 2 * n * d * f),
    ]
    layers = cfg["num_layers"]
    blocks = [(f"{name} ×{layers}", formula, layers * b * v) for name, formula, v in per_block]
    fd, td, idim = cfg["freq_dim"], cfg["text_dim"], cfg["image_dim"]
    other = [
        ("patch embedding (Conv3d)", "2·N·Cin·pt·ph·pw·d", 2 * n * cfg["in_channels"] * patch * d),
        ("text embedder", "2·Lt·(text_dim·d + d²)", 2 * lt * (td * d + d * d)),
        ("image embedder", "2·Li·(image_dim² + image_dim·d)", 2 * li * (idim * idim + idim * d)),
        ("time embedder + time_proj", "2·(freq·d + d² + 6d²)", 2 * (fd * d + d * d + 6 * d * d)),
        ("output proj", "2·N·d·Cout·pt·ph·pw", 2 * n * d * cfg["out_channels"] * patch),
    ]
    terms = blocks + [(name, formula, b * v) for name, formula, v in other]
    return sum(v for _, _, v in terms), terms


def build_model(cfg: dict, device: torch.device, dtype: torch.dtype) -> WanTransformer3DModel:
    # Allocating straight on the target device in the target dtype keeps host RAM out of it and
    # caps GPU memory at the bf16 weights (~33 GB). Not meta + to_empty: the RoPE tables are
    # buffers computed in __init__ and would come out as uninitialised memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = WanTransformer3DModel(**cfg)  # default nn init: small uniform values
    finally:
        torch.set_default_dtype(previous)
    # from_pretrained(torch_dtype=bf16) keeps these (tiny) modules in fp32; do the same so the
    # benchmark runs the same kernels as production.
    for name, param in model.named_parameters():
        if any(m in name.split(".") for m in model._keep_in_fp32_modules):
            param.data = param.data.float()
    return model.eval()


def timed_forwards(model, inputs: dict, iters: int, device: torch.device) -> list[float]:
    model(**inputs)  # warm-up: kernel selection, cuBLAS/cuDNN heuristics, allocator growth
    times = []
    for i in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(**inputs)[0]
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            out = model(**inputs)[0]
            times.append(time.perf_counter() - t0)
        finite = bool(out.isfinite().all())  # random weights: make sure nothing overflowed
        log(f"    iter {i + 1}/{iters}: {times[-1]:.3f} s  (output finite: {finite})")
    return times


def run_backend(key: str, model, inputs: dict, n: int, iters: int, device: torch.device) -> dict:
    kind, arg, cuda_only, dense_bytes = BACKENDS[key]
    batch = inputs["hidden_states"].shape[0]
    heads = model.config.num_attention_heads
    if cuda_only and device.type != "cuda":
        return {"status": f"skipped: CUDA-only backend, running on {device.type}"}
    if device.type == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    # A dense path holds at least one B x heads x N x N score matrix; at 75,600 tokens that is
    # hundreds of GB, so say so instead of waiting for an OOM.
    if dense_bytes and batch * heads * n * n * dense_bytes > free:
        need = batch * heads * n * n * dense_bytes / GB
        return {
            "status": f"skipped: materialises the {batch}x{heads}x{n}x{n} score matrix,"
            f" ≥ {need:,.1f} GB (only {free / GB:.1f} GB free)"
        }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        # sdpa rows pin diffusers to "native" (plain F.scaled_dot_product_attention) and restrict
        # PyTorch's kernel choice; diffusers rows switch diffusers' global attention dispatcher.
        dispatcher = arg if kind == "diffusers" else "native"
        kernels = sdpa_kernel(arg) if kind == "sdpa" and arg else contextlib.nullcontext()
        with torch.inference_mode(), attention_backend(dispatcher), kernels:
            times = timed_forwards(model, inputs, iters, device)
    except torch.cuda.OutOfMemoryError as e:
        return {"status": f"skipped: out of memory ({str(e).splitlines()[0][:120]})"}
    except Exception as e:  # no kernel for this shape/dtype/device, missing package, ...
        return {"status": f"skipped: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"}
    row = {"status": "ok", "mean": sum(times) / len(times), "min": min(times)}
    if device.type == "cuda":
        row["peak_gb"] = torch.cuda.max_memory_allocated() / GB
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--iters", type=int, default=3, help="timed forwards per backend (+1 warm-up)")
    ap.add_argument("--frames", type=int, help="video frames, 4k+1 (default 81; --tiny 5)")
    ap.add_argument("--height", type=int, help="pixels, multiple of 16 (default 720; --tiny 64)")
    ap.add_argument("--width", type=int, help="pixels, multiple of 16 (default 1280; --tiny 64)")
    ap.add_argument("--backends", help="comma list from: " + ", ".join(BACKENDS))
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--peak-tflops", type=float, help="override the dense bf16 peak of the GPU")
    ap.add_argument("--tiny", action="store_true", help="toy config on any device (smoke test)")
    args = ap.parse_args()

    frames = args.frames or (5 if args.tiny else 81)
    height = args.height or (64 if args.tiny else 720)
    width = args.width or (64 if args.tiny else 1280)
    if (frames - 1) % 4 or height % 16 or width % 16 or args.iters < 1:
        ap.error("need frames = 4k+1, height/width multiples of 16 (VAE /8, patch /2), iters >= 1")
    keys = args.backends.split(",") if args.backends else list(BACKENDS)
    if unknown := [k for k in keys if k not in BACKENDS]:
        ap.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available; the full-size benchmark needs a GPU (try --tiny).")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        log.file = open(args.out, "w")  # noqa: SIM115 - stays open for the whole run

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    if device.type == "cpu":
        try:  # bf16 matmul exists on practically every CPU build; fall back to fp32 if not
            torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        except RuntimeError:
            dtype = torch.float32
    cfg = TINY_CONFIG if args.tiny else FULL_CONFIG

    now = datetime.now(timezone.utc)
    log(
        f"# Wan2.1-I2V DiT forward benchmark, {now:%Y-%m-%d %H:%M:%SZ}, host {socket.gethostname()}"
    )
    versions = f"torch {torch.__version__}  diffusers {diffusers.__version__}"
    log(f"python {platform.python_version()}  {versions}")
    peak = args.peak_tflops
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = peak or next((v for s, v in PEAK_TFLOPS if s in props.name), None)
        log(f"device {props.name}  {props.total_memory / GB:.1f} GB  sm_{props.major}{props.minor}")
        log(f"CUDA {torch.version.cuda}  cuDNN {torch.backends.cudnn.version()}")
    else:
        log(f"device cpu ({platform.machine()}), {torch.get_num_threads()} threads")
    log("dense bf16 peak:", f"{peak} TFLOP/s" if peak else "unknown peak")
    log(f"DIFFUSERS_ATTN_BACKEND={os.environ.get('DIFFUSERS_ATTN_BACKEND', '(unset: native)')}")
    log(f"config ({'tiny' if args.tiny else 'full'}, {dtype}): {cfg}")

    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / GB
    log(f"built in {time.perf_counter() - t0:.1f} s: {n_params:,} params, {weight_gb:.2f} GB")
    if device.type == "cuda":
        log(f"peak GPU memory while building: {torch.cuda.max_memory_allocated() / GB:.2f} GB")

    # Latent of a real I2V job: 16 noise channels + 20 conditioning (4 mask + 16 VAE-encoded
    # first frame), 4x temporal / 8x spatial VAE compression.
    b, lat_f, lat_h, lat_w = 1, (frames - 1) // 4 + 1, height // 8, width // 8
    pt, ph, pw = cfg["patch_size"]
    n = (lat_f // pt) * (lat_h // ph) * (lat_w // pw)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    inputs = {
        "hidden_states": randn(b, cfg["in_channels"], lat_f, lat_h, lat_w),
        "timestep": torch.full((b,), 999.0, device=device),
        "encoder_hidden_states": randn(b, TEXT_TOKENS, cfg["text_dim"]),
        "encoder_hidden_states_image": randn(b, IMAGE_TOKENS, cfg["image_dim"]),
        "return_dict": False,
    }
    log(f"input {frames}x{height}x{width} px -> latent {tuple(inputs['hidden_states'].shape)}")
    grid = f"{lat_f // pt}·{lat_h // ph}·{lat_w // pw}"
    log(f"N = {grid} = {n:,} video tokens, Lt = {TEXT_TOKENS} text, Li = {IMAGE_TOKENS} image")

    flops, terms = count_flops(cfg, b, n)
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    log(f"FLOPs per forward (B={b}, d={d}, F={cfg['ffn_dim']}, dkv={cfg['added_kv_proj_dim']}):")
    for name, formula, value in terms:
        log(f"  {name:<30} {formula:<32} {value / 1e12:>12.6g} TFLOP")
    log(f"  {'total':<30} {'':<32} {flops / 1e12:>12.6g} TFLOP")

    results = {}
    for key in keys:
        log(f"\n== {key}")
        row = results[key] = run_backend(key, model, inputs, n, args.iters, device)
        gc.collect()  # drop a failed attempt's frames and tensors before returning the memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if row["status"] == "ok":
            row["tflops"] = flops / row["mean"] / 1e12
            log(f"  {row['mean']:.3f} s mean, {row['min']:.3f} s min, {row['tflops']:.4g} TFLOP/s")
        else:
            log(f"  {row['status']}")

    log(f"\n{'backend':<28} | s/fwd mean |  s/fwd min |  TFLOP/s | % peak | peak mem GB")
    log("-" * 85)
    for key, r in results.items():
        if r["status"] != "ok":
            log(f"{key:<28} | {r['status']}")
            continue
        pct = f"{100 * r['tflops'] / peak:6.1f}" if peak else f"{'-':>6}"
        mem = f"{r['peak_gb']:11.2f}" if "peak_gb" in r else f"{'-':>11}"
        tf = f"{r['tflops']:8.4g}"
        log(f"{key:<28} | {r['mean']:10.3f} | {r['min']:10.3f} | {tf} | {pct} | {mem}")
    log(f"({flops / 1e12:.6g} TFLOP/forward; % of {peak or 'unknown'} TFLOP/s dense bf16 peak)")
    log("(peak memory = torch.cuda.max_memory_allocated per backend, weights included)")
    if log.file is not None:
        log.file.close()


if __name__ == "__main__":
    main()
