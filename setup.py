"""Builds the CPU kernels (foresight_lab/kernels/*.cc) into foresight_lab._kernels.

Everything else about the package is in pyproject.toml. The kernels are optional: where
they cannot be compiled, installation goes on and the pure-JAX paths serve instead.
"""

import pathlib

import jaxlib
from setuptools import Extension, setup

XLA_FFI_HEADERS = pathlib.Path(jaxlib.__file__).parent / "include"

setup(
    ext_modules=[
        Extension(
            "foresight_lab._kernels",
            sources=[
                "foresight_lab/kernels/qmatmul.cc",
                "foresight_lab/kernels/attention.cc",
                "foresight_lab/kernels/zeros.cc",
            ],
            depends=["foresight_lab/kernels/common.h"],
            include_dirs=[str(XLA_FFI_HEADERS)],
            language="c++",
            # No fused multiply-add contraction: dequantized weights must equal the
            # reference's floats exactly (multiply, then add).
            extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-w"],
            optional=True,
        )
    ]
)
