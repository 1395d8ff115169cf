"""On a device mesh (8 CPU devices faked by XLA), the engine gives the same tokens."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = """
import json
import jax
import foresight_lab as fl
from foresight_lab.engine.kv_cache import EngineConfig
from foresight_lab.lab import Lab
from tests.tiny import tiny_loaded_model

model = tiny_loaded_model("qwen3")
config = EngineConfig(max_slots=8, max_cache_length=128, prefill_chunk=32, min_cache_bucket=64)
single = Lab(model, config)
sharded = Lab(model, config, mesh=fl.make_mesh(data=4, model=2))
prompt = [5, 6, 7, 8] * 10
report = {"devices": len(jax.devices()), "same": []}
for sampling in [dict(temperature=0), dict(temperature=1.0, seed=3, n=3, top_p=0.9, top_k=40)]:
    a = single.generate(prompt, max_tokens=20, **sampling)
    b = sharded.generate(prompt, max_tokens=20, **sampling)
    report["same"].append([c.token_ids for c in a.choices] == [c.token_ids for c in b.choices])
scheduler = sharded.engine._scheduler
report["cache_spec"] = str(scheduler.cache[0].sharding.spec)
report["mlp_spec"] = str(scheduler.params["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec)
before = sharded.engine.compile_count
sharded.generate(prompt, max_tokens=20, temperature=0)
report["recompiles"] = sharded.engine.compile_count - before
print(json.dumps(report))
"""


def test_a_mesh_of_8_devices_gives_the_same_tokens_as_one_device():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["same"] == [True, True]
    assert report["cache_spec"] == "P(None, 'data', 'model')"
    assert report["mlp_spec"] == "P(None, None, 'model')"
    assert report["recompiles"] == 0
