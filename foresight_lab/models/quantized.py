"""Weights kept in their GGUF blocks in memory, dequantized inside the jitted matmul.

A `QuantizedMatrix` is W: [N, K] (N outputs, K inputs, as GGUF stores a linear layer)
cut into blocks of 32 weights along K, as llama.cpp stores them:

    q4_1   values UInt8['N K/2']  two 4-bit weights a byte   w = d * q + m
           scales, mins Float16['N K/32']
    q8_0   values Int8['N K']                                w = d * q
           scales Float16['N K/32']

A layer's matrices are stacked over the decoder's layers, each array with a leading
axis [L, ...]; `matmul(x, w, layer=i)` reads layer i's in place.

`matmul(x, w)` is `x @ W.T`. It has two paths, which agree to about 2e-5 of the
output's scale:

- the reference, pure JAX and for every backend: `dequantize(w)` then a float32 dot.
  The dequantized floats equal the GGUF reader's (`gguf.quants.dequantize`) bit for
  bit. It serves GPU and TPU, prefill chunks (many rows, where the dot dominates) and
  device meshes, and it is what tests hold the kernel to.
- on the CPU, for a few rows (decode), a compiled kernel called through `jax.ffi`
  (`foresight_lab/kernels/qmatmul.cc`, built when the package is installed) that reads
  the blocks and never writes the dequantized matrix, so a decode step reads about the
  GGUF's bytes instead of float32's, four to seven times more. With AVX2 it rounds each
  block of 32 inputs to int16 (a scale per block) and sums integer products exactly.
  A q4_1 matrix with `activation_bits=8` rounds them to int8 instead, as llama.cpp
  does: about a fifth faster a decode step on the CPU, and about 1e-3 of the
  output's scale from the reference instead of 2e-5 (`with_activation_bits`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from foresight_lab.models import cpu_kernels

BLOCK = 32
KINDS = ("q4_1", "q8_0")
# The kernel serves calls with at most this many rows of x (decode steps); beyond it the
# dot of the dequantized matrix is faster (prefill chunks).
KERNEL_MAX_ROWS = 32
# Bits the CPU kernel rounds each block of x to: 16 (the default), or 8 for q4_1 matrices.
ACTIVATION_BITS = (16, 8)


def kernel_serves(rows: int) -> bool:
    """Whether a matmul of `rows` rows of x may run the CPU kernel (it and the reference
    round differently, so a row's result depends on which one runs)."""
    return rows <= KERNEL_MAX_ROWS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """W: [N, K] in GGUF blocks of 32 along K; see the module docstring."""

    values: jax.Array | np.ndarray
    scales: jax.Array | np.ndarray
    mins: jax.Array | np.ndarray | None
    kind: str = dataclasses.field(metadata=dict(static=True))
    activation_bits: int = dataclasses.field(default=16, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of one matrix (of each layer's, when stacked)."""
        *_, rows, blocks = self.scales.shape
        return rows, blocks * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.values, self.scales, self.mins) if a is not None)

    def map_rows(self, fn) -> QuantizedMatrix:
        """The same matrix with fn applied to each array along its first axis (rows;
        layers, when stacked)."""
        mins = None if self.mins is None else fn(self.mins)
        return dataclasses.replace(self, values=fn(self.values), scales=fn(self.scales), mins=mins)

    def arrays(self) -> tuple:
        return (
            (self.values, self.scales)
            if self.mins is None
            else (self.values, self.scales, self.mins)
        )


def stack(matrices: list[QuantizedMatrix]) -> QuantizedMatrix:
    """Matrices of one kind and shape stacked over a new leading axis (layers)."""
    kinds = {m.kind for m in matrices}
    if len(kinds) != 1:
        raise ValueError(f"cannot stack matrices of different kinds {sorted(kinds)}")
    fields = zip(*(m.arrays() for m in matrices), strict=True)
    values, scales, *mins = (np.stack([np.asarray(a) for a in f]) for f in fields)
    return QuantizedMatrix(values, scales, mins[0] if mins else None, matrices[0].kind)


def with_activation_bits(params, bits: int):
    """params with every q4_1 matrix's x rounded to `bits` in the CPU kernel (16 or 8;
    q8_0 matrices keep 16: their signed bytes meet x in 16-bit products)."""
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"activation_bits must be one of {ACTIVATION_BITS}, not {bits!r}")

    def apply(leaf):
        if isinstance(leaf, QuantizedMatrix) and leaf.kind == "q4_1":
            return dataclasses.replace(leaf, activation_bits=bits)
        return leaf

    is_matrix = lambda leaf: isinstance(leaf, QuantizedMatrix)  # noqa: E731
    return jax.tree_util.tree_map(apply, params, is_leaf=is_matrix)


def from_gguf_blocks(blocks: np.ndarray, kind: str, shape: tuple[int, int]) -> QuantizedMatrix:
    """Splits a GGUF tensor's raw blocks, UInt8['N bytes'], into a QuantizedMatrix."""
    rows, columns = shape
    if kind == "q4_1":
        b = blocks.reshape(rows, columns // BLOCK, 20)
        return QuantizedMatrix(
            values=np.ascontiguousarray(b[..., 4:]).reshape(rows, columns // 2),
            scales=np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0],
            mins=np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0],
            kind=kind,
        )
    if kind == "q8_0":
        b = blocks.reshape(rows, columns // BLOCK, 34)
        return QuantizedMatrix(
            values=np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, columns),
            scales=np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0],
            mins=None,
            kind=kind,
        )
    raise ValueError(f"no in-memory form for GGUF blocks of kind {kind!r}; kinds: {KINDS}")


def dequantize(w: QuantizedMatrix) -> jax.Array:
    """W as Float32['N K'], equal to the GGUF reader's floats."""
    rows, columns = w.shape
    d = w.scales.astype(jnp.float32)[..., None, None]  # [N K/32 1 1]
    if w.kind == "q4_1":
        # Weights 0-15 of a block are the low nibbles, 16-31 the high ones: one shift
        # broadcast over a new axis of two. (A concatenate of the two halves made XLA on
        # the CPU emit a fusion several times slower, a third of a short prefill's time.)
        packed = w.values.reshape(rows, columns // BLOCK, 1, BLOCK // 2)
        shifts = jnp.asarray([0, 4], jnp.uint8)[:, None]  # [2 1]
        q = ((packed >> shifts) & 0x0F).astype(jnp.float32)  # [N K/32 2 16]
        values = d * q + w.mins.astype(jnp.float32)[..., None, None]
    else:
        values = w.values.reshape(rows, columns // BLOCK, 1, BLOCK).astype(jnp.float32) * d
    return values.reshape(rows, columns)


def take_rows(w: QuantizedMatrix, ids: jax.Array) -> jax.Array:
    """Rows `ids` (any shape) of W, dequantized: Float32[*ids.shape, K] (an embedding)."""
    picked = w.map_rows(lambda a: jnp.take(a, ids.reshape(-1), axis=0))
    return dequantize(picked).reshape(*ids.shape, w.shape[1])


def matmul(
    x: jax.Array, w: QuantizedMatrix, use_kernel: bool = True, layer: jax.Array | None = None
) -> jax.Array:
    """x @ W.T for x: Float[..., K] -> Float32[..., N]; W is layer `layer` of a stacked
    w, or w itself when layer is None.

    use_kernel allows the CPU kernel where it is built and x has few rows; the
    backend is chosen when the function is lowered, so the same jitted code runs on
    GPU and TPU through the reference path.
    """
    rows, columns = w.shape
    flat = x.reshape(-1, columns).astype(jnp.float32)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)
    stacked = w.scales.ndim == 3

    def reference(flat, w, layer):
        if stacked:
            w = w.map_rows(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False))
        return jnp.dot(flat, dequantize(w).T)

    allowed = use_kernel and kernel_serves(flat.shape[0])
    out = cpu_kernels.call_or_reference(allowed, _kernel_matmul, reference, flat, w, layer)
    return out.reshape(*x.shape[:-1], rows)


def _kernel_matmul(flat: jax.Array, w: QuantizedMatrix, layer: jax.Array) -> jax.Array:
    """The kernel reads layer `layer` of stacked arrays in place (ignored unstacked)."""
    result = jax.ShapeDtypeStruct((flat.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(_TARGETS[w.kind, w.activation_bits], result)(flat, *w.arrays(), layer)


_TARGETS = {
    ("q4_1", 16): cpu_kernels.Q4_1_MATMUL,
    ("q4_1", 8): cpu_kernels.Q4_1_MATMUL_8,
    ("q8_0", 16): cpu_kernels.Q8_0_MATMUL,
}
