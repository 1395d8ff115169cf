"""One Flax decoder for the Llama family: Llama, SmolLM2, Mistral, Qwen2 and Qwen3.

The forward pass is pure: parameters are a plain pytree, the KV cache goes in and
comes out as a tuple of per-layer `(k, v)` arrays. The same call serves prefill
(many tokens of one row) and decode (one token of many rows):

    cache k, v: Float['slots Hkv S D']   (S = cache length; slot position = token position)

        slot  0  1  2  3  4  5  6 ...
    row r0   [a][b][c][d][ ][ ][ ]     tokens of a row are written at their positions;
    row r0+1 [a][b][x][y][z][ ][ ]     a query at position p attends to slots 0..p only,
                                       so stale entries beyond p are never read.

`row_start` picks which rows of the cache this call's batch occupies, `kv_length`
(static) how many slots attention reads; positions at or beyond the cache length are
padding: their writes are dropped.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from foresight_lab.models import cpu_kernels, quantized
from foresight_lab.models.config import ModelConfig, RopeScaling

LayerCache = tuple[jax.Array, jax.Array]  # (k, v), each Float['slots Hkv S D']


def _quantized_param(module: nn.Module, name: str) -> quantized.QuantizedMatrix | None:
    """The parameter `name` when it was loaded in quantized blocks (never at init)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, quantized.QuantizedMatrix):
            return value
    return None


class Linear(nn.Module):
    """`x @ kernel (+ bias)`: kernel stored as Float[in, out], or quantized as [out, in]
    (see models.quantized); `cpu_kernel` allows the compiled CPU kernel for the latter."""

    features: int
    use_bias: bool = False
    cpu_kernel: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if (blocks := _quantized_param(self, "kernel")) is not None:
            y = quantized.matmul(x, blocks, self.cpu_kernel).astype(x.dtype)
        else:
            kernel = self.param(
                "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), jnp.float32
            )
            y = jnp.dot(x, kernel.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


class Embed(nn.Module):
    """Token embeddings, Float[V, H] or quantized; `attend` is the tied output layer."""

    num_embeddings: int
    features: int
    cpu_kernel: bool = True

    def setup(self):
        self.blocks = _quantized_param(self, "embedding")
        if self.blocks is None:
            self.embedding = self.param(
                "embedding",
                nn.linear.default_embed_init,
                (self.num_embeddings, self.features),
                jnp.float32,
            )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.blocks is not None:
            return quantized.take_rows(self.blocks, tokens)
        return jnp.take(self.embedding, tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        if self.blocks is not None:
            return quantized.matmul(x, self.blocks, self.cpu_kernel)
        return jnp.dot(x, self.embedding.T)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale * x32).astype(x.dtype)


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None,
    freq_factors: tuple[float, ...] | None = None,
) -> jax.Array:
    """Inverse frequencies, Float['D/2'], with Llama 3 scaling when configured."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if freq_factors is not None:
        return inv_freq / jnp.asarray(freq_factors, jnp.float32)
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band
    # between them interpolated smoothly.
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = context / scaling.low_freq_factor
    high_freq_wavelength = context / scaling.high_freq_factor
    scaled = jnp.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return jnp.where(in_band, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x: Float['B T H D'] by positions: Int['B T'] ("rotate half" layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B T D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig
    cpu_kernel: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # Float['B T H']
        positions: jax.Array,  # Int['B T']
        layer_cache: LayerCache,
        row_start: jax.Array,  # Int[]
        kv_length: int,
    ) -> tuple[jax.Array, LayerCache]:
        c = self.config
        batch, length, _ = x.shape
        q = Linear(c.num_heads * c.head_dim, c.attention_bias, self.cpu_kernel, name="q_proj")(x)
        k = Linear(c.num_kv_heads * c.head_dim, c.attention_bias, self.cpu_kernel, name="k_proj")(x)
        v = Linear(c.num_kv_heads * c.head_dim, c.attention_bias, self.cpu_kernel, name="v_proj")(x)
        q = q.reshape(batch, length, c.num_heads, c.head_dim)
        k = k.reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
        inv_freq = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, c.rope_freq_factors)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        k_cache, v_cache = layer_cache
        rows = row_start + jnp.arange(batch)[:, None]  # [B 1], broadcast against positions
        # Indices on axes 0 and 2 around a slice: the update is laid out [B T Hkv D].
        k_cache = k_cache.at[rows, :, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, :, positions].set(v.astype(v_cache.dtype), mode="drop")
        out = attend(q, k_cache, v_cache, positions, row_start, kv_length, self.cpu_kernel)
        return Linear(c.hidden_size, cpu_kernel=self.cpu_kernel, name="o_proj")(out), (
            k_cache,
            v_cache,
        )


def attend(
    q: jax.Array,  # Float['B T Hq D'], rotated
    k_cache: jax.Array,  # Float['slots Hkv S D'], this call's keys already written
    v_cache: jax.Array,  # Float['slots Hkv S D']
    positions: jax.Array,  # Int['B T']
    row_start: jax.Array,  # Int[]
    kv_length: int,
    use_kernel: bool = True,
) -> jax.Array:
    """Causal attention of q over the cache rows row_start.., Float['B T Hq*D'].

    A query at position p sees cache positions 0..p (and at most kv_length of them).
    One token a row (decode) on the CPU runs the compiled kernel
    (`kernels/attention.cc`), which reads each row's visible positions in place;
    otherwise, and as its reference, the pure-JAX path below.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    groups = heads // kv_heads
    # Grouped-query attention: each kv head serves `groups` query heads, whose queries
    # are stacked as rows g * T + t, so both products are plain batched matmuls over
    # (B, Hkv) on the cache's own layout.
    q = q.reshape(batch, length, kv_heads, groups, head_dim)
    q = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * length, head_dim)
    args = (q, k_cache, v_cache, positions, row_start)
    reference = functools.partial(_reference_attention, kv_length=kv_length)
    if (
        use_kernel
        and length == 1
        and q.dtype == k_cache.dtype == v_cache.dtype == jnp.float32
        and cpu_kernels.available()
    ):
        kernel = functools.partial(_kernel_attention, kv_length=kv_length)
        out = jax.lax.platform_dependent(*args, cpu=kernel, default=reference)
    else:
        out = reference(*args)
    out = out.reshape(batch, kv_heads, groups, length, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads * head_dim)


def _reference_attention(q, k_cache, v_cache, positions, row_start, kv_length):
    """Float['B Hkv G*T D'] from the window of kv_length positions of rows row_start.."""
    batch, kv_heads, rows, head_dim = q.shape
    groups = rows // positions.shape[1]
    window = (batch, kv_heads, kv_length, head_dim)
    start = (row_start, 0, 0, 0)
    keys = jax.lax.dynamic_slice(k_cache, start, window)  # [B Hkv S D]
    values = jax.lax.dynamic_slice(v_cache, start, window)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, keys.astype(q.dtype))
    scores = scores.astype(jnp.float32) / math.sqrt(head_dim)
    visible = jnp.arange(kv_length)[None, None, :] <= positions[:, :, None]  # [B T S]
    visible = jnp.tile(visible, (1, groups, 1))[:, None]  # [B 1 G*T S]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkqs,bksd->bkqd", weights, values.astype(q.dtype))


def _kernel_attention(q, k_cache, v_cache, positions, row_start, kv_length):
    """The CPU kernel for one token a row: q Float['B Hkv G D'] -> the same shape."""
    call = jax.ffi.ffi_call(
        cpu_kernels.DECODE_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32)
    )
    return call(
        q,
        k_cache,
        v_cache,
        positions[:, 0].astype(jnp.int32),
        jnp.asarray(row_start, jnp.int32),
        kv_length=kv_length,
    )


class MLP(nn.Module):
    config: ModelConfig
    cpu_kernel: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = Linear(c.intermediate_size, cpu_kernel=self.cpu_kernel, name="gate_proj")(x)
        up = Linear(c.intermediate_size, cpu_kernel=self.cpu_kernel, name="up_proj")(x)
        return Linear(c.hidden_size, cpu_kernel=self.cpu_kernel, name="down_proj")(
            jax.nn.silu(gate) * up
        )


class Block(nn.Module):
    config: ModelConfig
    cpu_kernel: bool = True

    @nn.compact
    def __call__(self, x, positions, layer_cache, row_start, kv_length):
        c = self.config
        h, layer_cache = Attention(c, self.cpu_kernel, name="attn")(
            RMSNorm(c.rms_norm_eps, name="input_norm")(x),
            positions,
            layer_cache,
            row_start,
            kv_length,
        )
        x = x + h
        x = x + MLP(c, self.cpu_kernel, name="mlp")(
            RMSNorm(c.rms_norm_eps, name="post_attention_norm")(x)
        )
        return x, layer_cache


class Decoder(nn.Module):
    """tokens, positions, cache -> logits, cache.

    cpu_kernel: quantized weights may use the compiled CPU kernel (models.quantized);
    off on a device mesh, where XLA partitions the pure-JAX path.
    """

    config: ModelConfig
    cpu_kernel: bool = True

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,  # Int['B T']
        positions: jax.Array,  # Int['B T']
        cache: tuple[LayerCache, ...],
        row_start: jax.Array | int = 0,
        kv_length: int | None = None,
        return_logits: bool = True,
    ) -> tuple[jax.Array | None, tuple[LayerCache, ...]]:
        c = self.config
        kv_length = kv_length or cache[0][0].shape[2]
        embed = Embed(c.vocab_size, c.hidden_size, self.cpu_kernel, name="embed")
        x = embed(tokens).astype(jnp.float32)
        new_cache = []
        for i in range(c.num_layers):
            x, layer_cache = Block(c, self.cpu_kernel, name=f"layers_{i}")(
                x, positions, cache[i], jnp.asarray(row_start, jnp.int32), kv_length
            )
            new_cache.append(layer_cache)
        if not return_logits:
            return None, tuple(new_cache)
        x = RMSNorm(c.rms_norm_eps, name="final_norm")(x)
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear(c.vocab_size, cpu_kernel=self.cpu_kernel, name="lm_head")(x)
        return logits.astype(jnp.float32), tuple(new_cache)


def empty_cache(
    config: ModelConfig, slots: int, length: int, dtype=jnp.float32
) -> tuple[LayerCache, ...]:
    """A zeroed cache of `slots` rows by `length` positions, one (k, v) pair per layer."""
    shape = (slots, config.num_kv_heads, length, config.head_dim)
    return tuple(
        (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)
    )
