"""The KV cache is allocated zeroed without being made resident (kernels/zeros.cc): the
OS holds its pages only once positions in them are written."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from foresight_lab.engine.kv_cache import EngineConfig, allocate
from foresight_lab.models import cpu_kernels
from foresight_lab.models.config import ModelConfig

MB = 2**20


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("shape", [(3,), (5000, 7), (1000, 1000), (3, 4099)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_the_kernel_zeroes_memory_that_held_other_values(shape, dtype):
    assert cpu_kernels.available()

    def zeroed_in_place(dirty):
        result = jax.ShapeDtypeStruct(dirty.shape, dirty.dtype)
        return jax.ffi.ffi_call(cpu_kernels.ZEROS, result, input_output_aliases={0: 0})(dirty)

    dirty = jnp.full(shape, 3, dtype)
    memory = dirty.unsafe_buffer_pointer()
    zeroed = jax.jit(zeroed_in_place, donate_argnums=0)(dirty)
    assert zeroed.unsafe_buffer_pointer() == memory  # the very bytes that held threes
    np.testing.assert_array_equal(np.asarray(zeroed), np.zeros(shape, dtype))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_an_allocated_cache_reads_as_zeros_and_is_not_yet_resident():
    model = ModelConfig(
        family="llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    config = EngineConfig(max_slots=64, max_cache_length=2048, kv_cache_dtype="float32")
    budget = config.cache_bytes(model)
    assert budget >= 128 * MB
    before = resident_bytes()
    keys, values = allocate(model, config)
    jax.block_until_ready((keys, values))
    assert resident_bytes() - before < budget / 8
    assert keys.shape == values.shape and keys.dtype == jnp.float32
    # Reading maps the kernel's shared zero page, not memory of its own.
    assert not np.asarray(keys).any() and not np.asarray(values).any()
    assert resident_bytes() - before < budget / 8
    written = keys.at[:, 5, :, 7].set(1.0)  # one position of one slot, every layer
    assert float(written.sum()) == written[:, 5, :, 7].size
