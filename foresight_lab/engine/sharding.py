"""Placing parameters and the KV cache on a device mesh.

A mesh has two axes: "data" splits the cache's slots (batch rows), "model" splits
attention heads and MLP columns (tensor parallelism). JAX's compiler partitions the
same jitted functions to match, so one CPU, 8 GPUs or a TPU slice run the same code.
A dimension that the axis does not divide evenly stays whole (replicated).

    q/k/v_proj kernel  [hidden, heads*D]   columns over "model" (whole heads)
    o_proj kernel      [heads*D, hidden]   rows over "model"
    gate/up kernel     [hidden, mlp]       columns over "model"
    down kernel        [mlp, hidden]       rows over "model"
    (a quantized kernel is stored [out, in]: the same split on the other axis)
    cache k, v         [L, slots, Hkv, S, D]  slots over "data", kv heads over "model"

Layer parameters are stacked, [L, ...] (models.decoder); their layer axis stays whole.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from foresight_lab.models.config import ModelConfig

DATA, MODEL = "data", "model"


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A (data, model) mesh over the given devices (all local devices by default)."""
    devices = list(devices if devices is not None else jax.devices())
    model = model or len(devices) // data
    if data * model != len(devices):
        raise ValueError(
            f"a {data} x {model} mesh needs {data * model} devices, not {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def _split(size: int, mesh: Mesh, axis: str) -> str | None:
    return axis if size % mesh.shape[axis] == 0 else None


def param_specs(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """A PartitionSpec for every parameter, by its path in the pytree."""
    heads_split = config.num_kv_heads % mesh.shape[MODEL] == 0
    mlp = _split(config.intermediate_size, mesh, MODEL)

    def spec(path, leaf) -> P:
        names = [getattr(key, "key", getattr(key, "name", str(key))) for key in path]
        split = matrix_spec(names, leaf)
        return P(None, *split) if names[0] == "layers" and split else split

    def matrix_spec(names, leaf) -> P:
        if len(names) >= 3 and names[-2] == "kernel":  # a QuantizedMatrix's array
            layer, kind, flip = names[-3], "kernel", True
        else:
            layer, kind, flip = names[-2], names[-1], False
        if layer in ("q_proj", "k_proj", "v_proj") and heads_split:
            split = P(None, MODEL) if kind == "kernel" else P(MODEL)
        elif layer == "o_proj" and heads_split:
            split = P(MODEL, None)
        elif layer in ("gate_proj", "up_proj"):
            split = P(None, mlp)
        elif layer == "down_proj":
            split = P(mlp, None)
        else:
            return P()
        if flip:  # [out, in]; blocks of 32 along "in" must divide over the axis too
            split = P(*reversed(split))
            if split[1] is not None and leaf.shape[-1] % mesh.shape[MODEL]:
                return P()
        return split

    return jax.tree_util.tree_map_with_path(spec, params)


def cache_spec(config: ModelConfig, slots: int, mesh: Mesh) -> P:
    return P(None, _split(slots, mesh, DATA), _split(config.num_kv_heads, mesh, MODEL), None, None)


def shard_params(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    specs = param_specs(params, config, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
