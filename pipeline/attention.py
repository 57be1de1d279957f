"""Which attention kernel the transformer runs: ATTENTION_BACKEND, checked and applied once.

Owns the names a node accepts, finding out which of them can run on this device (the
package present, the device kind, and one tiny real call), timing the exact ones for
`auto`, and making every rank of an engine use the same one. Must never pick a lossy
kernel on its own: 8-bit kernels (sage) run only when named explicitly, and an explicit
name that cannot run here stops the engine with a message saying what is missing, never
a silent fallback to another kernel.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import BackendUnavailable

if TYPE_CHECKING:  # torch loads lazily: the worker's settings import the names above
    import torch

log = logging.getLogger(__name__)

EXACT_BACKENDS = (
    "native",
    "_native_math",
    "_native_flash",
    "_native_cudnn",
    "_native_efficient",
    "flash",
    "_flash_3",
    "xformers",
    "_native_npu",
    "flex",
)
"""diffusers backends that compute softmax(QK^T)V in the model's dtype (no quantisation)."""

LOSSY_BACKENDS = (
    "sage",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
)
"""Kernels that quantise Q and K to 8 bits: faster, not bit-comparable; explicit name only."""

AUTO = "auto"
ATTENTION_BACKENDS = (AUTO, *EXACT_BACKENDS, *LOSSY_BACKENDS)
"""Every value ATTENTION_BACKEND accepts."""

AUTO_CANDIDATES = tuple(b for b in EXACT_BACKENDS if b not in ("_native_math", "flex"))
"""What `auto` times: the exact kernels that can be fast. `_native_math` (the reference,
which materialises the whole attention matrix) and `flex` (unfused unless compiled) are
left out: at 720p they would only take memory and minutes to lose."""

# What each backend needs beyond the diffusers check: (package, device kinds).
_NEEDS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "native": (None, ("cuda", "npu", "cpu")),
    "_native_math": (None, ("cuda", "npu", "cpu")),
    "_native_flash": (None, ("cuda", "cpu")),
    "_native_cudnn": (None, ("cuda",)),
    "_native_efficient": (None, ("cuda",)),
    "flash": ("flash_attn>=2.6.3", ("cuda",)),
    "_flash_3": ("flash_attn_3", ("cuda",)),
    "xformers": ("xformers", ("cuda",)),
    "_native_npu": ("torch_npu", ("npu",)),
    "flex": (None, ("cuda", "cpu")),
    **{name: ("sageattention>=2.1.1", ("cuda",)) for name in LOSSY_BACKENDS},
}

_PROBE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 4e-2}


@dataclass(frozen=True)
class BackendChoice:
    """The backend an engine runs, and for `auto` what each candidate took (ms per call)."""

    name: str
    requested: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.timings_ms:
            return self.name
        timed = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(self.timings_ms.items()))
        return f"{self.name} (auto: {timed})"


def _backend_enum(name: str) -> Any:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName(name)


def _missing(name: str, device: torch.device) -> str | None:
    """What `name` lacks on `device` (package or device kind), or None."""
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements

    package, kinds = _NEEDS[name]
    lacks = []
    try:
        _check_attention_backend_requirements(_backend_enum(name))
    except RuntimeError:
        lacks.append(f"the {package} package")
    if device.type not in kinds:
        lacks.append(" or ".join(f"a {k.upper()} device" for k in kinds if k != "cpu"))
    return " and ".join(lacks) or None


def _call(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(q, k, v, backend=_backend_enum(name))


def _probe(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run `name` once on a tiny input shaped like ours (fewer keys than queries, as the
    Ulysses path passes them); None when it works (and, if exact, matches the reference)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, head_dim, generator=gen) for n in (24, 20, 20))
    try:
        with warnings.catch_warnings():  # flex: "called without torch.compile()"
            warnings.simplefilter("ignore")
            out = _call(name, *(t.to(device, dtype) for t in (q, k, v)))
    except Exception as exc:  # every kernel fails in its own way (TypeError, RuntimeError...)
        return f"a test call failed: {type(exc).__name__}: {str(exc)[:200]}"
    if name in EXACT_BACKENDS:
        qd, kd, vd = (t.transpose(1, 2).double() for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2)
        err = (out.double().cpu() - ref).abs().max().item()
        if not err <= _PROBE_TOLERANCE.get(_dtype_name(dtype), 4e-2):
            return f"its test call is off by {err:.1e}"
    return None


def available_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """The names of ATTENTION_BACKENDS (except `auto`) that run here, in that order."""
    return [
        name
        for name in ATTENTION_BACKENDS[1:]
        if _missing(name, device) is None and _probe(name, device, dtype, head_dim) is None
    ]


def _refuse(requested: str, reason: str, device: torch.device, dtype: torch.dtype, hd: int) -> Any:
    have = ", ".join(available_backends(device, dtype, hd)) or "none"
    return BackendUnavailable(
        f"ATTENTION_BACKEND={requested} {reason}; this node ({device.type}, "
        f"{_dtype_name(dtype)}) has: {have}"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    import torch

    if device.type in ("cuda", "npu"):
        getattr(torch, device.type).synchronize(device)


def time_backend(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, calls: int) -> float:
    """Milliseconds per call of `name` on q/k/v (one untimed call first; the fastest kept)."""
    _call(name, q, k, v)
    _sync(q.device)
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        _call(name, q, k, v)
        _sync(q.device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def choose_backend(
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    head_dim: int,
    seq_len: int,
    calls: int = 3,
) -> BackendChoice:
    """The backend for ATTENTION_BACKEND=`requested` on this device (raises
    BackendUnavailable when it cannot run). `auto` times every available exact backend on
    q/k/v of shape (1, seq_len, heads, head_dim): this rank's heads over the whole
    sequence, as the Ulysses path attends, and picks the fastest."""
    import torch

    requested = requested.strip().lower()
    if requested not in ATTENTION_BACKENDS:
        raise BackendUnavailable(
            f"ATTENTION_BACKEND={requested} is not a backend this node knows; use one of "
            f"{', '.join(ATTENTION_BACKENDS)}"
        )
    if requested != AUTO:
        missing = _missing(requested, device)
        if missing is not None:
            raise _refuse(requested, f"needs {missing}", device, dtype, head_dim)
        problem = _probe(requested, device, dtype, head_dim)
        if problem is not None:
            raise _refuse(requested, f"cannot run here: {problem}", device, dtype, head_dim)
        return BackendChoice(requested, requested)
    candidates = [
        name
        for name in AUTO_CANDIDATES
        if _missing(name, device) is None and _probe(name, device, dtype, head_dim) is None
    ]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, seq_len, heads, head_dim, generator=gen).to(device, dtype) for _ in range(3)
    )
    timings: dict[str, float] = {}
    for name in candidates:
        try:
            timings[name] = time_backend(name, q, k, v, calls)
        except Exception as exc:  # e.g. out of memory at the real size: not a candidate
            log.warning("attention backend %s failed at %d tokens: %s", name, seq_len, exc)
    if not timings:
        return BackendChoice("native", AUTO)
    return BackendChoice(min(timings, key=timings.__getitem__), AUTO, timings)


def apply_backend(
    transformer: Any,
    requested: str,
    ranks: Any,
    seq_len: int,
) -> BackendChoice:
    """Choose on rank 0, broadcast, and set the same backend on every rank's transformer
    (`ranks`: pipeline.parallel.Ranks). Every rank calls this at the same point of its load.

    `set_attention_backend` also sets diffusers' process-wide active backend (and
    `reset_attention_backend` does not undo it): acceptable here, an engine rank is a
    process of its own that runs one model."""
    config = transformer.config
    heads = config.num_attention_heads // ranks.ulysses_size
    dtype = transformer.dtype
    device = ranks.device
    outcome: tuple[str, Any] = ("error", "rank 0 did not decide")
    if ranks.rank == 0:
        try:
            outcome = (
                "ok",
                choose_backend(requested, device, dtype, heads, config.attention_head_dim, seq_len),
            )
        except BackendUnavailable as exc:
            outcome = ("unavailable", str(exc))
        except Exception as exc:  # the others wait in the broadcast: tell them, then raise
            outcome = ("error", f"{type(exc).__name__}: {exc}")
    outcome = ranks.broadcast_object(outcome)
    if outcome[0] == "unavailable":
        raise BackendUnavailable(outcome[1])
    if outcome[0] != "ok":
        raise RuntimeError(f"choosing the attention backend failed on rank 0: {outcome[1]}")
    choice: BackendChoice = outcome[1]
    transformer.set_attention_backend(choice.name)
    return choice
