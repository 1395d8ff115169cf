"""Reads a Hugging Face model directory: config.json and *.safetensors shards."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from safetensors import safe_open

from foresight_lab.models.config import ModelConfig
from foresight_lab.weights.gguf import NotAModelError
from foresight_lab.weights.name_maps import build_params


def read_hf_config(directory: pathlib.Path) -> dict:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise NotAModelError(
            f"{directory} has no config.json; is it a Hugging Face model directory?"
        )
    return json.loads(config_file.read_text())


def read_hf_directory(directory: str | pathlib.Path, on_tensor=None) -> tuple[ModelConfig, dict]:
    """(config, params) of a Hugging Face checkpoint directory."""
    directory = pathlib.Path(directory)
    config = ModelConfig.from_hf(read_hf_config(directory))
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise NotAModelError(f"{directory} has no *.safetensors weights")
    where: dict[str, pathlib.Path] = {}
    for shard in shards:
        with safe_open(shard, framework="flax") as f:
            where.update(dict.fromkeys(f.keys(), shard))

    def get_tensor(name: str) -> np.ndarray:
        if name not in where:
            raise NotAModelError(f"{directory} has no tensor {name!r}")
        with safe_open(where[name], framework="flax") as f:
            return np.asarray(f.get_tensor(name).astype("float32"))

    return config, build_params(config, get_tensor, "hf", on_tensor=on_tensor)


def params_from_state_dict(config: ModelConfig, state_dict: dict) -> dict:
    """The parameter pytree from in-memory tensors with Hugging Face names (numpy or torch)."""

    def get_tensor(name: str) -> np.ndarray:
        value = state_dict[name]
        return value.detach().float().numpy() if hasattr(value, "detach") else np.asarray(value)

    return build_params(config, get_tensor, "hf")
