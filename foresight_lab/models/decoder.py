"""One Flax decoder for the Llama family: Llama, SmolLM2, Mistral, Qwen2 and Qwen3.

The forward pass is pure: parameters are a plain pytree, the KV cache goes in and
comes out as a pair of `(k, v)` arrays. The same call serves prefill (many tokens of
one row) and decode (one token of many rows):

    cache k, v: Float['L slots Hkv S D']   (S = cache length; slot position = token position)

        slot  0  1  2  3  4  5  6 ...
    row r0   [a][b][c][d][ ][ ][ ]     tokens of a row are written at their positions;
    row r0+1 [a][b][x][y][z][ ][ ]     a query at position p attends to slots 0..p only,
                                       so stale entries beyond p are never read.

`rows` picks the cache row of each batch row (by default batch row b is cache row
b, as in a decode step; a prefill of several prompts names each one's slot),
`kv_length` (static) how many slots attention reads; positions at or beyond the cache
length are padding: their writes are dropped.

The layers run as one loop (`nn.scan`), so a compiled function holds one layer's code
rather than L copies of it. Every layer parameter is stacked, [L, ...] under
`params["layers"]`, and the cache too; each layer reads its slice at its index
(`layer`, traced). The slice is never copied out for the CPU kernels: they take the
stacked array and the index, and the cache is written in place at [layer, row, :, pos].
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from foresight_lab.models import cpu_kernels, quantized
from foresight_lab.models.config import ModelConfig, RopeScaling

Cache = tuple[jax.Array, jax.Array]  # (k, v), each Float['L slots Hkv S D']


def cache_length(cache: Cache) -> int:
    """S: positions per row; a position at or beyond it is padding (an idle row)."""
    return cache[0].shape[3]


def at_layer(stacked: jax.Array, layer: jax.Array | None) -> jax.Array:
    """One layer's slice of a stacked [L, ...] array (`layer` None: not stacked)."""
    if layer is None:
        return stacked
    return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], layers: int):
    """A float32 parameter, stacked [layers, *shape] when layers > 0."""
    return module.param(name, init, (layers, *shape) if layers else shape, jnp.float32)


def _quantized_param(module: nn.Module, name: str) -> quantized.QuantizedMatrix | None:
    """The parameter `name` when it was loaded in quantized blocks (never at init)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, quantized.QuantizedMatrix):
            return value
    return None


class Linear(nn.Module):
    """`x @ kernel (+ bias)`: kernel stored as Float[in, out], or quantized as [out, in]
    (see models.quantized); `cpu_kernel` allows the compiled CPU kernel for the latter.
    With `layers` > 0 the parameters are stacked over layers and called with `layer`."""

    features: int
    use_bias: bool = False
    cpu_kernel: bool = True
    layers: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        if (blocks := _quantized_param(self, "kernel")) is not None:
            y = quantized.matmul(x, blocks, self.cpu_kernel, layer).astype(x.dtype)
        else:
            shape = (x.shape[-1], self.features)
            kernel = _param(self, "kernel", nn.initializers.normal(0.02), shape, self.layers)
            y = layer_dot(x, kernel, layer, self.cpu_kernel)
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, (self.features,), self.layers)
            y = y + at_layer(bias, layer)
        return y


def layer_dot(
    x: jax.Array, kernel: jax.Array, layer: jax.Array | None, use_kernel: bool = True
) -> jax.Array:
    """x @ kernel[layer] for x: Float[..., in] and a float kernel stacked [L, in, out]
    (or x @ kernel, kernel Float[in, out], when layer is None).

    XLA on the CPU copies a layer's slice out of the stack before a dot, every step, and
    takes a matrix-vector path for one row that rounds unlike its matrix path; for a few
    rows (decode) the CPU kernel (`kernels/qmatmul.cc`) reads the layer in place and
    sums each row alone. The pure-JAX path is the reference and serves every other
    backend and prefill.
    """
    flat = x.reshape(-1, x.shape[-1])

    def reference(flat, kernel, layer):
        weights = kernel if kernel.ndim == 2 else at_layer(kernel, layer)
        return jnp.dot(flat, weights.astype(flat.dtype))

    args = (flat, kernel, jnp.asarray(0 if layer is None else layer, jnp.int32))
    y = cpu_kernels.call_or_reference(
        _float_kernel_serves(flat, kernel, use_kernel), _kernel_layer_dot, reference, *args
    )
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def transposed_dot(x: jax.Array, weights: jax.Array, use_kernel: bool = True) -> jax.Array:
    """x @ weights.T for x: Float[..., K] and float weights Float[N, K] (a tied
    embedding as the output layer); a decode step's rows run the CPU kernel, for the
    reason `layer_dot` gives."""
    flat = x.reshape(-1, x.shape[-1])

    def reference(flat, weights):
        return jnp.dot(flat, weights.T.astype(flat.dtype))

    allowed = _float_kernel_serves(flat, weights, use_kernel)
    y = cpu_kernels.call_or_reference(allowed, _kernel_transposed_dot, reference, flat, weights)
    return y.reshape(*x.shape[:-1], weights.shape[0])


def _float_kernel_serves(flat: jax.Array, weights: jax.Array, use_kernel: bool) -> bool:
    return (
        use_kernel
        and quantized.kernel_serves(flat.shape[0])
        and flat.dtype == weights.dtype == jnp.float32
    )


def _kernel_layer_dot(flat: jax.Array, kernel: jax.Array, layer: jax.Array) -> jax.Array:
    result = jax.ShapeDtypeStruct((flat.shape[0], kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(cpu_kernels.F32_MATMUL, result)(flat, kernel, layer)


def _kernel_transposed_dot(flat: jax.Array, weights: jax.Array) -> jax.Array:
    result = jax.ShapeDtypeStruct((flat.shape[0], weights.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(cpu_kernels.F32_MATMUL_TRANSPOSED, result)(flat, weights)


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
        return transposed_dot(x, self.embedding, self.cpu_kernel)


class RMSNorm(nn.Module):
    eps: float
    layers: int = 0  # > 0: the scale is stacked over layers and called with `layer`

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), self.layers)
        scale = at_layer(scale, layer)
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
        cache: Cache,
        rows: jax.Array | None,  # Int['B'], each batch row's cache row; None: 0..B-1
        layer: jax.Array,  # Int[]
        kv_length: int,
    ) -> tuple[jax.Array, Cache]:
        c = self.config
        batch, length, _ = x.shape

        def project(name: str, heads: int) -> jax.Array:
            features, bias = heads * c.head_dim, c.attention_bias
            linear = Linear(features, bias, self.cpu_kernel, c.num_layers, name=name)
            return linear(x, layer).reshape(batch, length, heads, c.head_dim)

        q = project("q_proj", c.num_heads)
        k = project("k_proj", c.num_kv_heads)
        v = project("v_proj", c.num_kv_heads)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, c.num_layers, name="q_norm")(q, layer)
            k = RMSNorm(c.rms_norm_eps, c.num_layers, name="k_norm")(k, layer)
        inv_freq = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, c.rope_freq_factors)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        k_cache, v_cache = cache
        written = (jnp.arange(batch) if rows is None else rows)[:, None]  # [B 1]
        # Indices on axes 0, 1 and 3 around a slice: the update is laid out [B T Hkv D].
        k_cache = k_cache.at[layer, written, :, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[layer, written, :, positions].set(v.astype(v_cache.dtype), mode="drop")
        out = attend(q, k_cache, v_cache, positions, rows, layer, kv_length, self.cpu_kernel)
        o_proj = Linear(
            c.hidden_size, cpu_kernel=self.cpu_kernel, layers=c.num_layers, name="o_proj"
        )
        return o_proj(out, layer), (k_cache, v_cache)


def attend(
    q: jax.Array,  # Float['B T Hq D'], rotated
    k_cache: jax.Array,  # Float['L slots Hkv S D'], this call's keys already written
    v_cache: jax.Array,  # Float['L slots Hkv S D']
    positions: jax.Array,  # Int['B T']
    rows: jax.Array | None,  # Int['B'], the cache row of each batch row; None: 0..B-1
    layer: jax.Array,  # Int[]
    kv_length: int,
    use_kernel: bool = True,
) -> jax.Array:
    """Causal attention of q over layer `layer`'s cache `rows`, Float['B T Hq*D'].

    A query at position p sees cache positions 0..p (and at most kv_length of them).
    One token a row (decode) on the CPU runs the compiled kernel
    (`kernels/attention.cc`), which reads each row's visible positions in place;
    otherwise, and as its reference, the pure-JAX path below.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    groups = heads // kv_heads
    # Grouped-query attention: each kv head serves `groups` query heads, whose queries
    # are stacked as rows g * T + t, so both products are plain batched matmuls over
    # (B, Hkv) on the cache's own layout.
    q = q.reshape(batch, length, kv_heads, groups, head_dim)
    q = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * length, head_dim)
    args = (q, k_cache, v_cache, positions, rows, jnp.asarray(layer, jnp.int32))
    reference = functools.partial(_reference_attention, kv_length=kv_length)
    kernel = functools.partial(_kernel_attention, kv_length=kv_length)
    allowed = (
        use_kernel
        and length == 1
        and q.dtype == jnp.float32
        and k_cache.dtype == v_cache.dtype
        and k_cache.dtype in (jnp.float32, jnp.float16)
    )
    out = cpu_kernels.call_or_reference(allowed, kernel, reference, *args)
    out = out.reshape(batch, kv_heads, groups, length, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads * head_dim)


# Query rows (grouped heads x tokens) whose attention a prefill computes at once.
QUERY_BLOCK = 512


def _reference_attention(q, k_cache, v_cache, positions, rows, layer, kv_length):
    """Float['B Hkv G*T D'] from the window of kv_length positions of the cache `rows`."""
    batch, kv_heads, query_rows, head_dim = q.shape
    groups = query_rows // positions.shape[1]

    def window(cache):  # [B Hkv S D]
        if rows is None:  # rows 0..B-1: one slice
            size = (1, batch, kv_heads, kv_length, head_dim)
            return jax.lax.dynamic_slice(cache, (layer, 0, 0, 0, 0), size)[0]
        return cache.at[layer, rows, :, :kv_length].get(mode="clip")  # one gather

    keys, values = window(k_cache), window(v_cache)
    visible = jnp.arange(kv_length)[None, None, :] <= positions[:, :, None]  # [B T S]
    visible = jnp.tile(visible, (1, groups, 1))[:, None]  # [B 1 G*T S]

    def rows_attention(q, visible):  # the rows' Float['B Hkv Q D'], Bool['B 1 Q S']
        scores = jnp.einsum("bkqd,bksd->bkqs", q, keys.astype(q.dtype))
        scores = scores.astype(jnp.float32) / math.sqrt(head_dim)
        scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        return jnp.einsum("bkqs,bksd->bkqd", weights, values.astype(q.dtype))

    if query_rows <= QUERY_BLOCK or query_rows % QUERY_BLOCK:
        return rows_attention(q, visible)
    # A long chunk's rows a block at a time: its scores and weights, [B Hkv Q S] each,
    # were most of a 512-token prefill's temporaries (30.1 -> 21.5 MB with SmolLM2;
    # 48.8 -> 29.3 at S 1024), at the same speed (smaller blocks were slower). A row's
    # result is its own either way, but for the order XLA's dots sum in.
    blocks = query_rows // QUERY_BLOCK

    def split(a):  # [B H G*T X] -> [blocks B H QUERY_BLOCK X]
        return jnp.moveaxis(a.reshape(*a.shape[:2], blocks, QUERY_BLOCK, a.shape[-1]), 2, 0)

    out = jax.lax.map(lambda block: rows_attention(*block), (split(q), split(visible)))
    return jnp.moveaxis(out, 0, 2).reshape(batch, kv_heads, query_rows, head_dim)


def _kernel_attention(q, k_cache, v_cache, positions, rows, layer, kv_length):
    """The CPU kernel for one token a row: q Float['B Hkv G D'] -> the same shape."""
    call = jax.ffi.ffi_call(
        cpu_kernels.DECODE_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32)
    )
    return call(
        q,
        k_cache,
        v_cache,
        positions[:, 0].astype(jnp.int32),
        jnp.arange(q.shape[0], dtype=jnp.int32) if rows is None else rows,
        layer,
        kv_length=kv_length,
    )


class MLP(nn.Module):
    config: ModelConfig
    cpu_kernel: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, layer: jax.Array) -> jax.Array:
        c = self.config

        def linear(name: str, features: int, x: jax.Array) -> jax.Array:
            return Linear(features, cpu_kernel=self.cpu_kernel, layers=c.num_layers, name=name)(
                x, layer
            )

        gate = linear("gate_proj", c.intermediate_size, x)
        up = linear("up_proj", c.intermediate_size, x)
        return linear("down_proj", c.hidden_size, jax.nn.silu(gate) * up)


class Block(nn.Module):
    """One layer, the body of the decoder's loop: (x, cache), layer -> (x, cache)."""

    config: ModelConfig
    cpu_kernel: bool
    kv_length: int

    @nn.compact
    def __call__(self, carry, layer, positions, rows):
        x, cache = carry
        c = self.config

        def norm(name: str, x: jax.Array) -> jax.Array:
            return RMSNorm(c.rms_norm_eps, c.num_layers, name=name)(x, layer)

        h, cache = Attention(c, self.cpu_kernel, name="attn")(
            norm("input_norm", x), positions, cache, rows, layer, self.kv_length
        )
        x = x + h
        x = x + MLP(c, self.cpu_kernel, name="mlp")(norm("post_attention_norm", x), layer)
        return (x, cache), None


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
        cache: Cache,
        rows: jax.Array | None = None,  # Int['B'], each batch row's cache row
        kv_length: int | None = None,
        return_logits: bool = True,
    ) -> tuple[jax.Array, Cache]:
        """(logits, Float['B T V'], or with return_logits=False the final hidden states,
        Float['B T E'], which `output_logits` turns into the same logits; the cache)."""
        c = self.config
        kv_length = kv_length or cache_length(cache)
        embed = Embed(c.vocab_size, c.hidden_size, self.cpu_kernel, name="embed")
        x = embed(tokens).astype(jnp.float32)
        layers = nn.scan(
            Block,
            variable_broadcast="params",  # stacked, read at each layer's index
            split_rngs={"params": False},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=c.num_layers,
        )(c, self.cpu_kernel, kv_length, name="layers")
        (x, cache), _ = layers(
            (x, cache),
            jnp.arange(c.num_layers, dtype=jnp.int32),
            positions,
            None if rows is None else jnp.asarray(rows, jnp.int32),
        )
        x = RMSNorm(c.rms_norm_eps, name="final_norm")(x)
        if not return_logits:
            return x, cache
        if c.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear(c.vocab_size, cpu_kernel=self.cpu_kernel, name="lm_head")(x)
        return logits.astype(jnp.float32), cache


def output_logits(model: Decoder, params, hidden: jax.Array) -> jax.Array:
    """The logits, Float['... V'], of final hidden states, Float['... E'] (what `model`
    returns with return_logits=False), through its own output layer."""
    c = model.config
    if c.tie_word_embeddings:
        embed = Embed(c.vocab_size, c.hidden_size, model.cpu_kernel)
        logits = embed.apply({"params": params["embed"]}, hidden, method=Embed.attend)
    else:
        lm_head = Linear(c.vocab_size, cpu_kernel=model.cpu_kernel)
        logits = lm_head.apply({"params": params["lm_head"]}, hidden)
    return logits.astype(jnp.float32)


def cache_shape(config: ModelConfig, slots: int, length: int) -> tuple[int, ...]:
    """The shape of the cache's keys, and of its values: ['L slots Hkv S D']."""
    return (config.num_layers, slots, config.num_kv_heads, length, config.head_dim)


def empty_cache(config: ModelConfig, slots: int, length: int, dtype=jnp.float32) -> Cache:
    """A zeroed cache of `slots` rows by `length` positions for every layer: (k, v)."""
    shape = cache_shape(config, slots, length)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
