"""FSDP2-sharded transformer and text encoder on gloo ranks against the unsharded loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from i2v_fleet.pipeline import ModelLoadError, write_tiny_model
from i2v_fleet.pipeline.tiny import TINY_IMAGE_DIM, TINY_TEXT_DIM

from .ranks import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# fp32. Measured: the transformer within 6e-7 of the unsharded model (the gathered weights
# are the same values, the kernels see other buffers), the text encoder exactly equal.
TOLERANCE = 1e-5
CLIP_TOKENS = 17  # the tiny CLIP: (32 / 8) ** 2 patches + the class token


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, plus its transformer saved again in several files with an index,
    as the 14B checkpoint is."""
    from diffusers import WanTransformer3DModel

    root = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    WanTransformer3DModel.from_pretrained(root / "transformer").save_pretrained(
        root / "transformer_split", safe_serialization=True, max_shard_size="100KB"
    )
    return root


def _dit_inputs() -> dict[str, torch.Tensor]:
    """The engine's call at one step: latents + condition, 512 text tokens, CLIP tokens."""
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 36, 2, 8, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, TINY_TEXT_DIM, generator=g),
        "encoder_hidden_states_image": torch.randn(1, CLIP_TOKENS, TINY_IMAGE_DIM, generator=g),
    }


def _text_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 180, (1, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, 15:] = 0  # padded, as the engine pads to max_length
    return ids, mask


@pytest.fixture(scope="module")
def unsharded(tiny_root: Path) -> dict[str, Any]:
    """What the unsharded loaders (pipeline/loading.py's `from_pretrained`) give, once."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from i2v_fleet.pipeline.sharding import local_param_bytes

    dit = WanTransformer3DModel.from_pretrained(tiny_root / "transformer", dtype=torch.float32)
    text = UMT5EncoderModel.from_pretrained(tiny_root / "text_encoder", dtype=torch.float32)
    half = WanTransformer3DModel.from_pretrained(tiny_root / "transformer", dtype=torch.bfloat16)
    with torch.no_grad():
        return {
            "dit": dit.eval()(**_dit_inputs(), return_dict=False)[0].numpy(),
            "text": text.eval()(*_text_inputs()).last_hidden_state.numpy(),
            "rope": [dit.rope.freqs_cos.numpy(), dit.rope.freqs_sin.numpy()],
            "bytes": local_param_bytes(dit) + local_param_bytes(text),
            "bf16_dtypes": _dtypes(half),
        }


def _dtypes(model: Any) -> dict[str, str]:
    return {name: str(p.dtype) for name, p in model.named_parameters()} | {
        name: str(b.dtype) for name, b in model.named_buffers()
    }


def _rank_checks(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """This rank's sharded outputs, parameter bytes, rope tables and bf16 dtypes.

    Tensors go back as numpy: torch tensors would cross the result queue as shared
    memory that is gone once the rank exits."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from i2v_fleet.pipeline.sharding import (
        load_sharded,
        local_param_bytes,
        text_encoder_units,
        transformer_units,
    )

    cpu, fp32 = torch.device("cpu"), torch.float32
    # Two ranks read the index-and-several-files copy, four the single file.
    dit_dir = f"{root}/transformer_split" if world_size == 2 else f"{root}/transformer"
    dit = load_sharded(
        WanTransformer3DModel, dit_dir, dtype=fp32, device=cpu, units=transformer_units
    )
    text = load_sharded(
        UMT5EncoderModel, f"{root}/text_encoder", dtype=fp32, device=cpu, units=text_encoder_units
    )
    x = _dit_inputs()
    # The engine runs under inference_mode; no_grad must work after it on the same model.
    with torch.inference_mode():
        dit_inference = dit(**x, return_dict=False)[0]
        hidden = text(*_text_inputs()).last_hidden_state
    with torch.no_grad():
        dit_no_grad = dit(**x, return_dict=False)[0]
    out: dict[str, Any] = {
        "dit": [dit_inference.numpy(), dit_no_grad.numpy()],
        "text": hidden.numpy(),
        "bytes": local_param_bytes(dit) + local_param_bytes(text),
        "rope": [dit.rope.freqs_cos.numpy(), dit.rope.freqs_sin.numpy()],
        "frozen": not any(
            x.training or any(p.requires_grad for p in x.parameters(recurse=False))
            for m in (dit, text)
            for x in m.modules()
        ),
    }
    if world_size == 2:
        half = load_sharded(
            WanTransformer3DModel,
            dit_dir,
            dtype=torch.bfloat16,
            device=cpu,
            units=transformer_units,
        )
        out["bf16_dtypes"] = _dtypes(half)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_models_match_the_unsharded_ones(
    tiny_root: Path, unsharded: dict[str, Any], world_size: int
) -> None:
    results = run_ranks(_rank_checks, world_size, str(tiny_root))
    for r in results:
        assert r["frozen"]  # eval mode, no parameter requiring grad
        for out in r["dit"]:  # under inference_mode, then under no_grad
            np.testing.assert_allclose(out, unsharded["dit"], rtol=TOLERANCE, atol=TOLERANCE)
        np.testing.assert_allclose(r["text"], unsharded["text"], rtol=TOLERANCE, atol=TOLERANCE)
        # The rope tables are computed, not loaded: the same values in the same dtype
        # (float32 in diffusers 0.42.1: computed in float64, then stored as float32).
        for mine, theirs in zip(r["rope"], unsharded["rope"], strict=True):
            assert mine.dtype == theirs.dtype == np.float32
            np.testing.assert_array_equal(mine, theirs)
        if "bf16_dtypes" in r:
            # In bf16 the unsharded loader keeps Wan's norms, modulation tables and time
            # embedder in fp32, and the rope tables stay float32: the same here.
            assert r["bf16_dtypes"] == unsharded["bf16_dtypes"]
            assert r["bf16_dtypes"]["rope.freqs_cos"] == "torch.float32"
    # Every rank holds about 1/world of the weights (uneven remainders fall to the first
    # ranks), never the whole.
    largest = max(r["bytes"] for r in results)
    assert largest <= (0.34 if world_size == 4 else 0.6) * unsharded["bytes"]


def test_pickled_weights_are_refused_before_any_rank_work(tmp_path: Path) -> None:
    """No process group here: the refusal comes before the model is even built."""
    from transformers import UMT5EncoderModel

    from i2v_fleet.pipeline.sharding import load_sharded, text_encoder_units

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")

    with pytest.raises(ModelLoadError, match=r"pickled weights \(pytorch_model\.bin\)"):
        load_sharded(
            UMT5EncoderModel,
            tmp_path,
            dtype=torch.float32,
            device=torch.device("cpu"),
            units=text_encoder_units,
        )


def test_sharding_never_imports_the_whole_model_loader() -> None:
    """Both loaders take the checkpoint's layout from pipeline.checkpoint, so sharding has
    no import of pipeline.loading, at the top or inside a function (no import cycle)."""
    import ast

    import i2v_fleet.pipeline.sharding as sharding

    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(sharding.__file__).read_text())):
        if isinstance(node, ast.ImportFrom):
            names |= {node.module or "", *(a.name for a in node.names)}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    assert not [n for n in names if n.rsplit(".", 1)[-1] == "loading"]
