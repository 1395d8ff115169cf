"""The compiled CPU kernels (`foresight_lab/kernels/*.cc`), registered with XLA.

They are built into `foresight_lab._kernels` when the package is installed and called
through `jax.ffi`; each has a pure-JAX reference that serves every other backend and
that tests hold it to. Without a C++ compiler at install they are missing, a warning
says so once, and the references serve on the CPU too.
"""

from __future__ import annotations

import ctypes
import importlib.util
import warnings

import jax

# The XLA custom-call targets that the models call.
Q4_1_MATMUL = "foresight_lab_q4_1_matmul"
Q4_1_MATMUL_8 = "foresight_lab_q4_1_matmul_8"  # x rounded to 8 bits (activation_bits=8)
Q8_0_MATMUL = "foresight_lab_q8_0_matmul"
F32_MATMUL = "foresight_lab_f32_matmul"
F32_MATMUL_TRANSPOSED = "foresight_lab_f32_matmul_transposed"
DECODE_ATTENTION = "foresight_lab_decode_attention"
ZEROS = "foresight_lab_zeros"  # zeroed memory that is resident only once written
# Target -> the handler symbol exported by the library.
TARGETS = {
    Q4_1_MATMUL: "FlQ41Matmul",
    Q4_1_MATMUL_8: "FlQ41Matmul8",
    Q8_0_MATMUL: "FlQ80Matmul",
    F32_MATMUL: "FlF32Matmul",
    F32_MATMUL_TRANSPOSED: "FlF32MatmulTransposed",
    DECODE_ATTENTION: "FlDecodeAttention",
    ZEROS: "FlZeros",
}
_state: dict[str, bool] = {}


def available() -> bool:
    """Whether the kernels were built with the package and are registered with XLA."""
    if "available" not in _state:
        _state["available"] = _register()
    return _state["available"]


def call_or_reference(allowed: bool, kernel, reference, *args):
    """kernel(*args) on the CPU where `allowed` and the kernels are built, else, and on
    every other backend (chosen when the function is lowered), reference(*args)."""
    if allowed and available():
        return jax.lax.platform_dependent(*args, cpu=kernel, default=reference)
    return reference(*args)


def _register() -> bool:
    spec = importlib.util.find_spec("foresight_lab._kernels")
    if spec is None or spec.origin is None:
        warnings.warn(
            "foresight_lab's CPU kernels were not built (a C++ compiler is needed at "
            "install); quantized matmuls and decode attention use the slower pure-JAX "
            "paths. Reinstall with a compiler (g++ or clang++) to build them.",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    library = ctypes.CDLL(spec.origin)
    for target, symbol in TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    return True
