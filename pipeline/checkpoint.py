"""MODEL_CKPT_DIR on disk: the diffusers layout a checkpoint must have, and its weight files.

Owns the parts a checkpoint must hold, the refusal of pickled weights, the safetensors index
and the small JSON configs. Must never import torch or open a weight file: it only decides
what the loaders (pipeline.loading, pipeline.sharding) may read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

WEIGHT_PARTS = ("transformer", "vae", "text_encoder", "image_encoder")
"""Subfolders that hold weights (`*.safetensors`, possibly sharded with an index)."""

CONFIG_PARTS = {
    "tokenizer": ("tokenizer_config.json",),
    "image_processor": ("preprocessor_config.json",),
    "scheduler": ("scheduler_config.json",),
}
"""Subfolders that hold only configuration, with the file each must contain."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_checkpoint(path: str | Path) -> Path:
    """Raise `ModelLoadError` naming the first missing part or pickled file; return the path."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(
            f"MODEL_CKPT_DIR {root} is not a directory; point it at a download of "
            "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers (or run `i2v model tiny --out DIR`)"
        )
    for part in WEIGHT_PARTS:
        folder = root / part
        if not folder.is_dir():
            raise ModelLoadError(f"MODEL_CKPT_DIR {root} has no {part}/ folder")
        refuse_pickled(folder)
        if not any(folder.glob("*.safetensors")):
            raise ModelLoadError(f"{folder} has no *.safetensors weights")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} has no config.json")
    for part, files in CONFIG_PARTS.items():
        for name in files:
            if not (root / part / name).is_file():
                raise ModelLoadError(f"MODEL_CKPT_DIR {root} is missing {part}/{name}")
    return root


def refuse_pickled(folder: Path) -> None:
    """Raise `ModelLoadError` naming the pickled files in `folder`, if it holds any."""
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"{folder} holds pickled weights ({', '.join(pickled)}); only safetensors are "
            "loaded, because unpickling can run code. Convert them to safetensors and remove "
            "the pickled files"
        )


def weight_files(folder: Path) -> list[Path]:
    """A part's safetensors files: those its index names, else every one there (pickled
    weights refused first)."""
    refuse_pickled(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ModelLoadError(f"{folder} has several safetensors indexes: {indexes}")
    if indexes:
        weight_map = read_json(indexes[0])["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    return files


def read_json(path: Path) -> dict[str, Any]:
    """A configuration or index file of the checkpoint, as a dict."""
    value = json.loads(path.read_text())  # noqa: TID251 - a checkpoint file, not a message
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return value
