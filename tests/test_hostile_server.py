"""A real `mlflow models serve` on loopback under a bounded burst of hostile bodies: each answered
with a 4xx naming the problem, quickly, the server's memory bounded, and a normal request answered
right after (the burst itself: benchmarks/bench_hostile.py, whose figures BENCHMARKS.md records)."""

from __future__ import annotations

import importlib.util
import json
import sys

import mlflow
import numpy as np
import pytest
from conftest import PROJECT, stop_group, tiny_keras_model

from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.serving.pyfunc_model import log_model

pytestmark = pytest.mark.slow

# Measured on the 2-core machine shared with a training job (BENCHMARKS.md, "A hostile burst"):
# refusals take 0.1 s at the median; the slowest, 256 PNGs in a 17 MB `inputs` body, 1.6 s alone and
# up to 12 s in the burst, most of it MLflow echoing the parsed body back in its 400 answer. The
# server's tree peaked 0.54 GB over idle (parsing the bodies). Before these bounds, tta_shift 4000
# alone took 1.5 GB and the 256 PNGs would have decoded to about 30 GB.
SLOWEST_SECONDS = 15
PEAK_OVER_IDLE_BYTES = 2**30


def bench():
    spec = importlib.util.spec_from_file_location("bench_hostile", PROJECT / "benchmarks" / "bench_hostile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_a_burst_of_hostile_bodies_is_refused_quickly_within_bounded_memory(tmp_path):
    hostile = bench()
    with mlflow.start_run():
        uri = log_model(tiny_keras_model(), name="model").model_uri
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model"))
    bodies = hostile.hostile_bodies()
    port = hostile.free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = hostile.serve(local, port, log)
    try:
        hostile.wait_until_ready(port, process)
        url = f"http://127.0.0.1:{port}/invocations"
        pixels = hostile.crops(3)
        normal = json.dumps({"inputs": pixels}).encode()
        assert hostile.post(url, normal)[0] == 200  # warm: TensorFlow's first predict
        memory = hostile.TreeMemory(process.pid)
        idle = memory.now()
        with memory:
            answers = hostile.burst(url, bodies, requests=50, concurrency=4)
        assert {a.name for a in answers} == {name for name, _, _ in bodies}
        for answer in answers:
            assert 400 <= answer.status < 500 and answer.expected in answer.message, answer
            assert answer.seconds < SLOWEST_SECONDS, answer
        print(f"slowest {max(a.seconds for a in answers):.2f} s, idle {idle / 2**20:.0f} MB, "
              f"peak {memory.peak / 2**20:.0f} MB")
        assert memory.peak - idle < PEAK_OVER_IDLE_BYTES, (idle, memory.peak)
        status, text = hostile.post(url, normal)
        assert status == 200, text
        served = [[row[f"prob_{name}"] for name in CLASS_NAMES] for row in json.loads(text)["predictions"]]
        expected = mlflow.pyfunc.load_model(local).predict(np.asarray(pixels, np.uint8)).filter(like="prob_")
        np.testing.assert_allclose(served, expected, atol=1e-6)
    finally:
        stop_group(process)
        print(log_path.read_text()[-3000:])
