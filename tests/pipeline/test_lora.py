"""MODEL_LORAS: adapters fused into the transformer at load, unsharded and per FSDP rank,
and the turbo sampling (euler, no guidance) that step/CFG-distill adapters are made for.

The expected weights are computed here, independently: W + scale * (alpha / r) * B @ A
from the checkpoint's own tensors and the random A, B this file writes."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from i2v_fleet.pipeline import Generated, GenerationRequest, ModelLoadError, WanI2V, make_scheduler
from i2v_fleet.pipeline.loading import load_components
from i2v_fleet.pipeline.lora import LoraSpec, parse_loras

from .ranks import run_ranks

RANK, ALPHA = 4, 8.0
BLOCKS = 4  # the tiny transformer's


def _targets() -> list[tuple[str, str]]:
    """(diffusers module, original Wan module) for every linear layer a Wan LoRA adapts."""
    out = []
    for i in range(BLOCKS):
        for wan, ours in zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"], strict=True):
            out.append((f"blocks.{i}.attn1.{ours}", f"blocks.{i}.self_attn.{wan}"))
            out.append((f"blocks.{i}.attn2.{ours}", f"blocks.{i}.cross_attn.{wan}"))
        out.append((f"blocks.{i}.attn2.add_k_proj", f"blocks.{i}.cross_attn.k_img"))
        out.append((f"blocks.{i}.attn2.add_v_proj", f"blocks.{i}.cross_attn.v_img"))
        out.append((f"blocks.{i}.ffn.net.0.proj", f"blocks.{i}.ffn.0"))
        out.append((f"blocks.{i}.ffn.net.2", f"blocks.{i}.ffn.2"))
    return out


@dataclass(frozen=True)
class TinyLora:
    base: dict[str, torch.Tensor]
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)
    files: dict[str, Path]

    def expected(self, scale: float) -> dict[str, torch.Tensor]:
        """The checkpoint's weights with W + scale * (alpha / r) * B @ A for each module."""
        out = dict(self.base)
        for module, (down, up) in self.matrices.items():
            name = f"{module}.weight"
            out[name] = self.base[name] + scale * (ALPHA / RANK) * (up @ down)
        return out


@pytest.fixture(scope="module")
def tiny_lora(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyLora:
    """Random rank-4 A, B for every adapted layer, written in the layouts found in the wild."""
    from safetensors.torch import load_file, save_file

    (checkpoint,) = (tiny_model_dir / "transformer").glob("*.safetensors")
    base = load_file(str(checkpoint))
    g = torch.Generator().manual_seed(123)
    matrices = {}
    for module, _ in _targets():
        out_features, in_features = base[f"{module}.weight"].shape
        matrices[module] = (
            torch.randn(RANK, in_features, generator=g) * 0.1,
            torch.randn(out_features, RANK, generator=g) * 0.1,
        )
    out = tmp_path_factory.mktemp("loras")
    comfy: dict[str, torch.Tensor] = {}
    for module, wan in _targets():
        down, up = matrices[module]
        comfy[f"diffusion_model.{wan}.lora_down.weight"] = down
        comfy[f"diffusion_model.{wan}.lora_up.weight"] = up
        comfy[f"diffusion_model.{wan}.alpha"] = torch.tensor(ALPHA)
    files = {"comfy": out / "comfy.safetensors", "bare": out / "bare.safetensors"}
    save_file(comfy, str(files["comfy"]))
    save_file({k.removeprefix("diffusion_model."): v for k, v in comfy.items()}, str(files["bare"]))
    # diffusers' own layout, as save_lora_weights writes it: raw A, B, alpha in the header.
    files["diffusers"] = out / "diffusers.safetensors"
    save_file(
        {
            f"transformer.{module}.lora_{x}.weight": matrix
            for module, (down, up) in matrices.items()
            for x, matrix in (("A", down), ("B", up))
        },
        str(files["diffusers"]),
        metadata={
            "lora_adapter_metadata": json.dumps(
                {
                    "transformer.r": RANK,
                    "transformer.lora_alpha": ALPHA,
                    "transformer.target_modules": sorted(matrices),
                }
            )
        },
    )
    return TinyLora(base=base, matrices=matrices, files=files)


def _assert_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Adapted weights within 1e-6 of the expected ones (fp32), every other one unchanged."""
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)


# -- unsharded ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "scale"),
    [
        (["comfy"], 1.0),
        (["bare"], 1.0),
        (["diffusers"], 1.0),
        (["comfy"], 0.5),
        (["comfy", "diffusers"], 0.5),  # two adapters on the same layers add up
    ],
)
def test_fused_weights_equal_w_plus_scaled_b_a(
    tiny_model_dir: Path, tiny_lora: TinyLora, files: list[str], scale: float
) -> None:
    """Every layout (ComfyUI/Wan keys with alpha, the same without `diffusion_model.`,
    diffusers keys with alpha in the header) fuses to W + scale * alpha/r * B @ A."""
    specs = [LoraSpec(tiny_lora.files[f], scale) for f in files]
    components = load_components(tiny_model_dir, device="cpu", dtype=torch.float32, loras=specs)
    total = scale * len(files)
    _assert_weights(components.transformer.state_dict(), tiny_lora.expected(total))


def test_a_pickled_or_unknown_adapter_path_is_refused() -> None:
    """MODEL_LORAS takes only .safetensors paths, with an optional numeric scale."""
    assert parse_loras(" /m/a.safetensors:0.8 , /m/b.safetensors,") == (
        LoraSpec(Path("/m/a.safetensors"), 0.8),
        LoraSpec(Path("/m/b.safetensors"), 1.0),
    )
    assert parse_loras("") == ()
    for value in ("/m/a.bin", "/m/a.pt:1.0", "/m/a.ckpt"):
        with pytest.raises(ValueError, match=r"only \.safetensors"):
            parse_loras(value)
    with pytest.raises(ValueError, match="must be a scale"):
        parse_loras("/m/a.safetensors:strong")


def test_a_pickled_adapter_is_refused_at_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "adapter.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(ModelLoadError, match=r"only \.safetensors"):
        load_components(tiny_model_dir, device="cpu", loras=[LoraSpec(pickled)])


def _missing_module_file(folder: Path) -> Path:
    from safetensors.torch import save_file

    path = folder / "more_blocks.safetensors"
    save_file(
        {
            "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(RANK, 32),
            "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(32, RANK),
        },
        str(path),
    )
    return path


def test_an_adapter_for_a_module_the_model_lacks_stops_the_load(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A LoRA made for a deeper model is an error naming the module, not a partial fuse."""
    with pytest.raises(ModelLoadError, match=r"blocks\.7\.attn1\.to_q.*has no such module"):
        load_components(
            tiny_model_dir, device="cpu", loras=[LoraSpec(_missing_module_file(tmp_path))]
        )


def test_an_unreadable_key_stops_the_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"diffusion_model.blocks.0.mystery.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="not a Wan LoRA"):
        load_components(tiny_model_dir, device="cpu", loras=[LoraSpec(path)])


# -- FSDP: each rank fuses its own rows ------------------------------------------------


def _rank_rows(rank: int, world_size: int, root: str, lora: str, missing: str) -> dict[str, Any]:
    """This rank's rows of every adapted weight (global row offset, values), and the error
    a LoRA for a missing module gives. numpy crosses the result queue (see test_sharding)."""
    from diffusers import WanTransformer3DModel
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from i2v_fleet.pipeline.lora import read_loras
    from i2v_fleet.pipeline.sharding import load_sharded, transformer_units

    cpu, fp32 = torch.device("cpu"), torch.float32
    weights = read_loras([LoraSpec(Path(lora))])
    dit = load_sharded(
        WanTransformer3DModel,
        f"{root}/transformer",
        dtype=fp32,
        device=cpu,
        units=transformer_units,
        loras=weights,
    )
    rows: dict[str, Any] = {}
    for name, param in dit.named_parameters():
        assert isinstance(param, DTensor)
        _, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        rows[name] = (offset[0] if offset else 0, param.to_local().numpy().copy())
    try:
        load_sharded(
            WanTransformer3DModel,
            f"{root}/transformer",
            dtype=fp32,
            device=cpu,
            units=transformer_units,
            loras=read_loras([LoraSpec(Path(missing))]),
        )
        error = ""
    except ModelLoadError as exc:
        error = str(exc)
    return {"rows": rows, "error": error}


@pytest.mark.distributed
@pytest.mark.slow
def test_each_fsdp_rank_fuses_only_its_own_rows(
    tiny_model_dir: Path, tiny_lora: TinyLora, tmp_path: Path
) -> None:
    """On 2 ranks every rank holds its half of each adapted weight, already fused; put
    together they equal W + alpha/r * B @ A. A module the model lacks stops every rank."""
    missing = _missing_module_file(tmp_path)
    results = run_ranks(
        _rank_rows, 2, str(tiny_model_dir), str(tiny_lora.files["comfy"]), str(missing)
    )
    expected = tiny_lora.expected(1.0)
    got: dict[str, torch.Tensor] = {}
    for name, value in expected.items():
        parts = sorted((r["rows"][name] for r in results), key=lambda part: part[0])
        if value.dim() >= 1 and value.shape[0] >= 2:
            assert all(part[1].shape[0] < value.shape[0] for part in parts), name  # sharded
        got[name] = torch.from_numpy(np.concatenate([part[1] for part in parts]))
    _assert_weights(got, expected)
    for r in results:
        assert "blocks.7.attn1.to_q" in r["error"]
        assert "has no such module" in r["error"]


# -- against diffusers' own LoRA loading -----------------------------------------------


def _request(image: Image.Image, **overrides: Any) -> GenerationRequest:
    base = GenerationRequest(
        image=image,
        prompt="a cat walks along a sunlit windowsill",
        negative_prompt="blurry, low quality",
        width=96,
        height=64,
        num_frames=5,
        infer_steps=4,
        guidance_scale=3.0,
        seed=7,
    )
    return replace(base, **overrides)


def _frames(outcome: object) -> np.ndarray:
    assert isinstance(outcome, Generated)
    return outcome.frames


@pytest.mark.slow
def test_frames_match_diffusers_load_lora_weights_and_fuse_lora(
    tiny_model_dir: Path,
    tiny_lora: TinyLora,
    engine: WanI2V,
    small_image: Image.Image,
) -> None:
    """Our engine with MODEL_LORAS gives the frames of WanImageToVideoPipeline after its own
    load_lora_weights + fuse_lora (peft) on the same model, and the adapter matters.
    As in test_engine: one uint8 level where a value sits on .5."""
    pytest.importorskip("peft")
    from diffusers import WanImageToVideoPipeline

    path = tiny_lora.files["comfy"]
    request = _request(small_image)
    ours = _frames(
        WanI2V.load(tiny_model_dir, device="cpu", loras=(LoraSpec(path),)).generate(request)
    )
    plain = _frames(engine.generate(request))

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.load_lora_weights(str(path), adapter_name="tiny")
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.scheduler = make_scheduler(dict(pipe.scheduler.config), "unipc", 5.0)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        image=small_image,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        height=64,
        width=96,
        num_frames=5,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).frames[0]
    reference_u8 = np.round(reference * 255).astype(np.uint8)

    assert ours.shape == reference_u8.shape == (5, 64, 96, 3)
    diff = np.abs(ours.astype(int) - reference_u8.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.001
    assert np.abs(ours.astype(int) - plain.astype(int)).mean() > 1  # the LoRA changed them


# -- turbo: euler at the distilled timesteps, no unconditional pass ---------------------


def test_turbo_runs_one_conditional_pass_per_step_at_the_distilled_timesteps(
    engine: WanI2V, small_image: Image.Image
) -> None:
    """guidance 1 skips the unconditional branch: 4 steps are 4 transformer passes, at
    timesteps 1000, 750, 500, 250 shifted by 5; guidance 3 at 4 steps is 8 passes."""
    timesteps: list[float] = []

    def record(_: Any, __: Any, kwargs: dict[str, Any]) -> None:
        timesteps.append(float(kwargs["timestep"].flatten()[0]))

    hook = engine.c.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        turbo = engine.generate(_request(small_image, solver="euler", guidance_scale=1.0))
        turbo_steps = list(timesteps)
        timesteps.clear()
        engine.generate(_request(small_image, solver="euler", guidance_scale=3.0))
    finally:
        hook.remove()
    assert isinstance(turbo, Generated)
    assert turbo.frames.std() > 1
    shifted = [1000 * 5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]
    np.testing.assert_allclose(turbo_steps, shifted, rtol=1e-5)
    assert len(timesteps) == 8
