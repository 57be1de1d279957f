"""LoRA adapters (MODEL_LORAS) fused into the transformer's weights at engine start.

Owns reading the setting (`path[:scale],...`), reading each adapter file, converting its
keys to diffusers' module names, and the low-rank update `W += scale * B @ A` of every
module it names, which loading adds into the unsharded transformer (`fuse`) or, while
sharding, into each rank's own rows only (`LoraWeights.fused_rows`).

Must never unpickle or download: only `*.safetensors` files are read, with
`safetensors.safe_open`, and diffusers' converter is given the tensors as a dict. Must
never skip part of an adapter: a key naming a module the model lacks, or one of another
shape, stops the engine at start.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError

if TYPE_CHECKING:  # torch loads with the model, not with the settings that parse this
    import torch
    from torch import nn

log = logging.getLogger(__name__)

_KNOWN_PREFIXES = ("diffusion_model.", "lora_unet_", "transformer.")
"""Key prefixes diffusers' Wan converter recognises; bare Wan keys get `diffusion_model.`."""

_A, _B, _BIAS = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"


@dataclass(frozen=True)
class LoraSpec:
    """One adapter of MODEL_LORAS: a safetensors file and the strength it is fused with."""

    path: Path
    scale: float = 1.0


def parse_loras(value: str) -> tuple[LoraSpec, ...]:
    """MODEL_LORAS (`path[:scale],path[:scale]`, empty for none) as specs; `ValueError`
    naming the entry for anything that is not a `.safetensors` path with a number."""
    specs: list[LoraSpec] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        path, scale = entry, 1.0
        head, sep, tail = entry.rpartition(":")
        if sep and not tail.lower().endswith(".safetensors"):
            try:
                scale = float(tail)
            except ValueError:
                raise ValueError(
                    f"MODEL_LORAS entry {entry!r}: the part after the last ':' must be a "
                    "scale (a number, e.g. 1.0)"
                ) from None
            path = head
        if not path.lower().endswith(".safetensors"):
            raise ValueError(
                f"MODEL_LORAS entry {entry!r}: only .safetensors adapters are loaded "
                "(pickled .bin/.pt/.ckpt files can run code); convert it to safetensors"
            )
        specs.append(LoraSpec(Path(path), scale))
    return tuple(specs)


@dataclass(frozen=True)
class _Update:
    down: torch.Tensor  # A: (rank, in)
    up: torch.Tensor  # B: (out, rank)
    bias: torch.Tensor | None  # (out,)
    scale: float
    source: str


@dataclass
class LoraWeights:
    """Every adapter's low-rank updates, by diffusers module name (`blocks.0.attn1.to_q`)."""

    updates: dict[str, list[_Update]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.updates)

    @property
    def parameter_names(self) -> set[str]:
        """The parameters the adapters change (`<module>.weight`, and `.bias` for some)."""
        names = {f"{module}.weight" for module in self.updates}
        names |= {
            f"{m}.bias" for m, ups in self.updates.items() if any(u.bias is not None for u in ups)
        }
        return names

    def check(self, model: nn.Module) -> None:
        """`ModelLoadError` unless every module named is one of the model's linear layers,
        of the shape the adapter was made for. Works on a model still on meta."""
        from torch import nn

        modules = dict(model.named_modules())
        for name, updates in sorted(self.updates.items()):
            module = modules.get(name)
            sources = ", ".join(sorted({u.source for u in updates}))
            if not isinstance(module, nn.Linear):
                what = "has no such module" if module is None else f"has a {type(module).__name__}"
                raise ModelLoadError(
                    f"LoRA {sources} changes {name!r}, but the transformer {what}; "
                    "is the adapter made for Wan2.1 I2V 14B?"
                )
            for u in updates:
                expect = (module.out_features, module.in_features)
                got = (u.up.shape[0], u.down.shape[1])
                if got != expect or u.up.shape[1] != u.down.shape[0]:
                    raise ModelLoadError(
                        f"LoRA {u.source} changes {name!r} as {got[0]}x{got[1]} "
                        f"(rank {u.down.shape[0]}), but the module is {expect[0]}x{expect[1]}"
                    )
                if u.bias is not None and module.bias is None:
                    raise ModelLoadError(
                        f"LoRA {u.source} changes the bias of {name!r}, which has none"
                    )

    def fused_rows(
        self, name: str, rows: torch.Tensor, index: tuple[slice, ...], device: torch.device
    ) -> torch.Tensor:
        """Parameter `name`'s part `rows` (= the full tensor[index]) with the updates of its
        module added: fp32 math on `device`, cast back to `rows`' dtype once. Only the
        update's own rows are made (`B[index[0]] @ A[:, index[1]]`), never the full delta."""
        import torch

        module, _, kind = name.rpartition(".")
        updates = self.updates.get(module)
        if not updates or kind not in ("weight", "bias"):
            return rows
        out = rows.to(device=device, dtype=torch.float32)
        for u in updates:
            if kind == "weight":
                up = u.up[index[0]].to(device=device, dtype=torch.float32)
                down = u.down[:, index[1]].to(device=device, dtype=torch.float32)
                out += u.scale * (up @ down)
            elif u.bias is not None:
                out += u.scale * u.bias[index[0]].to(device=device, dtype=torch.float32)
        return out.to(rows.dtype)


def read_loras(specs: Sequence[LoraSpec]) -> LoraWeights:
    """Read and convert every adapter of `specs`; `ModelLoadError` names the file when one
    is missing, pickled, or not a Wan LoRA diffusers can convert."""
    weights = LoraWeights()
    for spec in specs:
        for module, update in _read_one(spec).items():
            weights.updates.setdefault(module, []).append(update)
    if specs:
        log.info(
            "LoRA: %d adapter(s) change %d modules: %s",
            len(specs),
            len(weights.updates),
            ", ".join(f"{s.path.name}x{s.scale:g}" for s in specs),
        )
    return weights


def _read_one(spec: LoraSpec) -> dict[str, _Update]:
    from diffusers import WanImageToVideoPipeline
    from safetensors import safe_open

    path = spec.path
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"LoRA {path}: only .safetensors adapters are loaded")
    if not path.is_file():
        raise ModelLoadError(f"LoRA {path} is not a file (MODEL_LORAS)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw: dict[str, torch.Tensor] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            header: dict[str, str] = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"LoRA {path} is not a readable safetensors file: {exc}") from exc
    diffusers_layout = any(k.startswith("transformer.") for k in raw)
    if raw and not any(k.startswith(_KNOWN_PREFIXES) for k in raw):
        raw = {f"diffusion_model.{k}": v for k, v in raw.items()}  # bare Wan keys
    full_diffs = sorted(k for k in raw if k.endswith(".diff"))
    try:
        converted: dict[str, torch.Tensor] = WanImageToVideoPipeline.lora_state_dict(raw)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"LoRA {path} is not a Wan LoRA diffusers can read: {exc}") from exc
    if full_diffs:
        log.warning(
            "LoRA %s: %d full-weight differences (e.g. %s) are not applied, as diffusers "
            "does not apply them either",
            path.name,
            len(full_diffs),
            full_diffs[0],
        )
    metadata = _adapter_metadata(header, path) if diffusers_layout else {}
    out: dict[str, _Update] = {}
    for key in converted:
        if key.endswith((_B, _BIAS)):
            continue
        if not (key.startswith("transformer.") and key.endswith(_A)):
            raise ModelLoadError(
                f"LoRA {path}: key {key!r} is not a transformer LoRA matrix "
                "(only the transformer's linear layers are adapted)"
            )
        module = key.removeprefix("transformer.").removesuffix(_A)
        up = converted.get(f"transformer.{module}{_B}")
        if up is None:
            raise ModelLoadError(f"LoRA {path}: {module!r} has lora_A but no lora_B")
        out[module] = _Update(
            down=converted[key],
            up=up,
            bias=converted.get(f"transformer.{module}{_BIAS}"),
            scale=spec.scale * _alpha_over_rank(metadata, module),
            source=path.name,
        )
    stray = sorted(
        k
        for k in converted
        if k.endswith((_B, _BIAS))
        and k.removeprefix("transformer.").removesuffix(_B).removesuffix(_BIAS) not in out
    )
    if stray:
        raise ModelLoadError(f"LoRA {path}: {stray[0]!r} has no matching lora_A")
    if not out:
        raise ModelLoadError(f"LoRA {path} holds no LoRA matrices for the transformer")
    return out


def _adapter_metadata(header: dict[str, str], path: Path) -> dict[str, Any]:
    """The `lora_adapter_metadata` JSON that diffusers' `save_lora_weights` writes."""
    text = header.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        meta = json.loads(text)  # noqa: TID251 - a file header, not a message
    except ValueError as exc:
        raise ModelLoadError(f"LoRA {path}: unreadable lora_adapter_metadata: {exc}") from exc
    return meta if isinstance(meta, dict) else {}


def _alpha_over_rank(meta: dict[str, Any], module: str) -> float:
    """lora_alpha / r for `module` as peft reads the metadata (per-module patterns first);
    1 without metadata: the converter has already folded `.alpha` into the matrices."""
    if "transformer.lora_alpha" not in meta and "transformer.r" not in meta:
        return 1.0
    rank = float(meta.get("transformer.r", 8))
    alpha = float(meta.get("transformer.lora_alpha", rank))
    rank = float(_pattern_value(meta.get("transformer.rank_pattern"), module, rank))
    alpha = float(_pattern_value(meta.get("transformer.alpha_pattern"), module, alpha))
    return alpha / rank


def _pattern_value(patterns: Any, module: str, default: float) -> Any:
    """peft's rule: the first pattern that matches the end of the module's name."""
    if not isinstance(patterns, dict):
        return default
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def fuse(model: nn.Module, weights: LoraWeights) -> None:
    """Add every update into an unsharded model's parameters, in place (fp32 math on the
    parameter's device, cast back once)."""
    import torch

    weights.check(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(weights.parameter_names):
            param = params[name]
            index = tuple(slice(0, n) for n in param.shape)
            param.data.copy_(weights.fused_rows(name, param.data, index, param.device))
