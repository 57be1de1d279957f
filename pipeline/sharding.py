"""FSDP2 sharding of the Wan transformer and the UMT5 text encoder over an engine's ranks.

Owns building a component on the meta device, sharding it unit by unit (then the root)
over every rank of the default process group, and filling each rank's shards straight
from the component's safetensors. Must never hold a full copy of the model on any rank:
each rank reads, from the memory-mapped files, only the rows of each tensor that it keeps
(no rank reads for another, rank 0 included; nothing goes over the process group); and
must never unpickle: only `*.safetensors` are read, pickled weights are refused.

    transformer = load_sharded(WanTransformer3DModel, root / "transformer", dtype=bf16,
                               device=device, units=transformer_units)

Every rank calls each forward with the same inputs (each unit's all-gather is a
collective), under `torch.inference_mode()` or `torch.no_grad()`, in any order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .checkpoint import weight_files
from .errors import ModelLoadError
from .lora import LoraWeights

log = logging.getLogger(__name__)


def transformer_units(model: Any) -> Iterable[nn.Module]:
    """WanTransformer3DModel's blocks: each is gathered for its forward, then freed."""
    return list(model.blocks)


def text_encoder_units(model: Any) -> Iterable[nn.Module]:
    """UMT5EncoderModel's encoder blocks (the tied embedding stays with the root)."""
    return list(model.encoder.block)


def load_sharded(
    cls: Any,
    folder: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    units: Callable[[Any], Iterable[nn.Module]],
    loras: LoraWeights | None = None,
) -> Any:
    """`cls` from `folder`, every unit and the root sharded over all ranks, in eval mode.

    Every rank of the default group must call this, with the same arguments; the folder
    must be readable by each. Parameters end in `dtype` except those the unsharded
    `from_pretrained` keeps in fp32 (Wan's time embedder, norms and modulation tables;
    UMT5's `wo` in fp16); buffers keep the dtype their module's constructor gave them
    (Wan's rope tables: float32, as unsharded). `loras` (pipeline.lora) are added into
    each rank's own rows as they are read (the adapter's rows for them, never a full delta).
    """
    folder = Path(folder)
    files = weight_files(folder)  # refuses pickled weights before anything else
    if not dist.is_initialized():
        raise RuntimeError("load_sharded needs torch.distributed.init_process_group first")
    model, buffers = _empty_model(cls, folder)
    if loras:
        loras.check(model)  # before any shard is read: a module it lacks stops the load
    _cast_params(model, dtype)
    # Frozen before sharding: FSDP2 insists on one dtype per unit only for trainable
    # parameters, and Wan's blocks mix bf16 weights with fp32 norms.
    model.eval().requires_grad_(False)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    # The root reshards too: with no backward coming, keeping its weights gathered after
    # a forward would only hold memory until the next one.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    model.to_empty(device=device)
    _restore_buffers(model, buffers, device)
    _fill_from_files(model, folder, files, loras or None)
    _allocate_gathered(model)
    log.info(
        "%s from %s sharded over %d ranks: %.0f MiB of parameters on this one",
        cls.__name__,
        folder,
        dist.get_world_size(),
        local_param_bytes(model) / 2**20,
    )
    return model


def _allocate_gathered(model: nn.Module) -> None:
    """Gather and free every unit once, outside inference mode.

    FSDP2 allocates each unit's gathered weights on its first all-gather and reuses them
    after. Allocated under `torch.inference_mode()` they would be inference tensors, and
    every later forward outside it (under `no_grad`) would fail to copy into them; made
    here, they are ordinary tensors that both modes can refill.
    """
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
                module.reshard()


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: a DTensor counts its local shard only."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


# -- building on meta -----------------------------------------------------------------


def _empty_model(cls: Any, folder: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model with its parameters on meta and its buffers computed, as its __init__
    computes them; returns the buffers too, since `to_empty` will wipe them."""
    from accelerate import init_empty_weights  # type: ignore[import-untyped]

    # include_buffers=False: buffers that __init__ computes (Wan's rope tables) are real
    # and small; only the parameters, the bulk, stay unallocated.
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "load_config"):  # diffusers
            model = cls.from_config(cls.load_config(folder))
        else:  # transformers
            model = cls(cls.config_class.from_pretrained(folder))
    if hasattr(model, "tie_weights"):
        # transformers ties UMT5's encoder.embed_tokens to shared only on load; tie now
        # so the two names stay one parameter through sharding.
        model.tie_weights()
    return model, dict(model.named_buffers())


def _cast_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`, except those `from_pretrained` would keep in fp32."""
    keep_fp32 = _fp32_rule(model, dtype)
    for name, param in model.named_parameters():
        if param.is_floating_point():
            # .data keeps the Parameter object, so tied parameters stay tied.
            param.data = param.data.to(torch.float32 if keep_fp32(name) else dtype)


def _fp32_rule(model: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Which parameter names the library's own loader keeps in fp32 at `dtype`."""
    if dtype == torch.float32:
        return lambda name: False
    plan = getattr(model, "_get_dtype_plan", None)
    if callable(plan):
        # transformers 5: a dtype plan of glob patterns, searched anywhere in the name
        # (UMT5: `wo` in fp16 only).
        globs = [g.replace("*", ".*") for g, d in plan(dtype).items() if d == torch.float32]
        pattern = re.compile("|".join(globs)) if globs else None
        return lambda name: pattern is not None and pattern.search(name) is not None
    # diffusers: `_keep_in_fp32_modules` names whole path segments, at any dtype.
    modules = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    return lambda name: any(part in modules for part in name.split("."))


def _restore_buffers(
    model: nn.Module, buffers: dict[str, torch.Tensor], device: torch.device
) -> None:
    """Put back the buffers `to_empty` left uninitialised; the persistent ones are then
    overwritten from the checkpoint, the others (rope tables) are never in it."""
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, value.to(device))


# -- filling shards from safetensors --------------------------------------------------


def _fill_from_files(
    model: nn.Module, folder: Path, files: list[Path], loras: LoraWeights | None = None
) -> None:
    """Copy into every parameter and persistent buffer its rows, one file at a time."""
    from safetensors import safe_open

    targets = _targets(model)
    filled: set[int] = set()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                target = targets.get(name)
                if target is None or id(target) in filled:
                    continue  # not ours (a key the library also ignores), or a tie's twin
                _fill(target, f, name, loras)
                filled.add(id(target))
    missing = sorted(n for n, t in targets.items() if id(t) not in filled)
    if missing:
        raise ModelLoadError(
            f"{folder} lacks {len(missing)} of the weights the model needs, e.g. {missing[:3]}"
        )


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every checkpoint name the model loads, tied aliases included, to its tensor."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for name, buffer in model.named_buffers(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        if attr not in model.get_submodule(owner)._non_persistent_buffers_set:
            out[name] = buffer
    return out


@torch.no_grad()
def _fill(target: torch.Tensor, f: Any, name: str, loras: LoraWeights | None = None) -> None:
    """Read only this rank's part of tensor `name` and copy it into `target`'s shard."""
    piece = f.get_slice(name)
    if list(piece.get_shape()) != list(target.shape):
        raise ModelLoadError(
            f"{name}: the checkpoint's shape {piece.get_shape()} is not the model's "
            f"{list(target.shape)}"
        )
    if isinstance(target, DTensor):
        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
    else:
        shape, offset = tuple(target.shape), (0,) * target.dim()
    index = tuple(slice(o, o + s) for s, o in zip(shape, offset, strict=True))
    rows = piece[index] if index else f.get_tensor(name)
    if loras is not None:
        rows = loras.fused_rows(name, rows, index, _local(target).device)
    _local(target).copy_(rows)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
