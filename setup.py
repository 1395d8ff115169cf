"""Builds the CPU kernel for quantized weights (foresight_lab/kernels/qmatmul.cc).

Everything else about the package is in pyproject.toml. The kernel is optional: where
it cannot be compiled, installation goes on and the pure-JAX path serves instead.
"""

import pathlib

import jaxlib
from setuptools import Extension, setup

XLA_FFI_HEADERS = pathlib.Path(jaxlib.__file__).parent / "include"

setup(
    ext_modules=[
        Extension(
            "foresight_lab._qmatmul",
            sources=["foresight_lab/kernels/qmatmul.cc"],
            include_dirs=[str(XLA_FFI_HEADERS)],
            language="c++",
            # No fused multiply-add contraction: dequantized weights must equal the
            # reference's floats exactly (multiply, then add).
            extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-w"],
            optional=True,
        )
    ]
)
