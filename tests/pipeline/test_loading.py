"""Loading from MODEL_CKPT_DIR: the diffusers layout, safetensors only, clear refusals."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from i2v_fleet.pipeline import ModelLoadError, WanI2V, check_checkpoint


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_tiny_model_has_the_real_checkpoint_layout(tiny_model_dir: Path) -> None:
    """The tiny model lists the same components as Wan2.1-I2V-14B-720P-Diffusers, in safetensors."""
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    for part in (
        "transformer",
        "vae",
        "text_encoder",
        "image_encoder",
        "tokenizer",
        "image_processor",
        "scheduler",
    ):
        assert part in index, part
    assert not list(tiny_model_dir.rglob("*.bin"))
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 2 * 1024 * 1024


def test_tiny_tokenizer_is_real(engine: WanI2V) -> None:
    """The tokenizer splits text into pieces, ends with </s> and pads with id 0, like T5's."""
    tokens = engine.c.tokenizer("a cat walks", padding="max_length", max_length=16)
    ids = tokens["input_ids"]
    assert ids[-1] == 0
    assert engine.c.tokenizer.eos_token_id in ids
    assert len([i for i in ids if i not in (0, engine.c.tokenizer.eos_token_id)]) >= 3


def test_loads_in_fp32_on_cpu(engine: WanI2V) -> None:
    """On the CPU every component is fp32 (bf16 is for accelerators)."""
    assert engine.c.dtype == torch.float32
    assert next(engine.c.transformer.parameters()).dtype == torch.float32


def test_t5_cpu_keeps_the_text_encoder_on_the_cpu(tiny_model_dir: Path) -> None:
    """With T5_CPU the text encoder's device is the CPU whatever the main device is."""
    engine = WanI2V.load(tiny_model_dir, device="cpu", t5_cpu=True)
    assert engine.c.text_device == torch.device("cpu")
    assert next(engine.c.text_encoder.parameters()).device == torch.device("cpu")


def test_missing_directory_is_named(tmp_path: Path) -> None:
    """A wrong MODEL_CKPT_DIR says which directory it looked at."""
    with pytest.raises(ModelLoadError, match="is not a directory"):
        check_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda m: shutil.rmtree(m / "vae"), "no vae/ folder"),
        (
            lambda m: [p.unlink() for p in (m / "transformer").glob("*.safetensors")],
            "transformer has no *.safetensors",
        ),
        (
            lambda m: (m / "scheduler" / "scheduler_config.json").unlink(),
            "scheduler/scheduler_config.json",
        ),
        (lambda m: (m / "text_encoder" / "config.json").unlink(), "text_encoder has no config"),
    ],
)
def test_an_incomplete_directory_names_the_missing_part(
    model_copy: Path, damage: object, words: str
) -> None:
    """Each missing part is reported by name before anything loads."""
    damage(model_copy)  # type: ignore[operator]
    with pytest.raises(ModelLoadError, match=re.escape(words)):
        WanI2V.load(model_copy, device="cpu")


class _Tripwire:
    """Unpickling this writes a file: proof that a loader unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "unpickled!"))  # type: ignore[return-value]


def test_pickled_weights_are_refused_and_never_unpickled(model_copy: Path, tmp_path: Path) -> None:
    """A .bin beside the weights is refused with a clear error, and is never unpickled."""
    tripwire = tmp_path / "tripwire.txt"
    (model_copy / "transformer" / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps(_Tripwire(str(tripwire)))
    )
    with pytest.raises(ModelLoadError, match=r"pickled weights \(diffusion_pytorch_model.bin\)"):
        WanI2V.load(model_copy, device="cpu")
    assert not tripwire.exists()


def test_checking_a_checkpoint_needs_no_torch() -> None:
    """pipeline.checkpoint, which both loaders use, imports neither torch nor a loader."""
    import subprocess
    import sys

    code = (
        "import sys, i2v_fleet.pipeline.checkpoint; "
        "print(sorted({'torch', 'i2v_fleet.pipeline.loading', 'i2v_fleet.pipeline.sharding'}"
        " & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_index_names_the_weight_files(tmp_path: Path) -> None:
    """With a safetensors index, exactly the files it names are read, once each."""
    from i2v_fleet.pipeline.checkpoint import weight_files

    for name in ("a.safetensors", "b.safetensors", "stray.safetensors"):
        (tmp_path / name).write_bytes(b"")
    index = {"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert weight_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
