"""Multi-worker training: workers described by TF_CONFIG, one run logged by the chief."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import all_runs, free_port
from mlflow import MlflowClient

from fer_mlflow.data import dataset as ds
from fer_mlflow.stages import train
from fer_mlflow.learning import distribution
from fer_mlflow.errors import ConfigError


@pytest.mark.parametrize("config, chief", [
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, True),
])
def test_the_chief_is_the_chief_task_or_worker_0_without_one(config, chief, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert distribution.is_chief(distribution.cluster()) is chief


@pytest.mark.parametrize("text", ["", "not json", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}'])
def test_a_missing_or_wrong_tf_config_is_one_line_naming_an_example(text, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(ConfigError, match="needs TF_CONFIG to describe the cluster.*e.g. "):
        distribution.cluster()


@pytest.mark.parametrize("given", [{"time_budget": 5}, {"resume": "0123456789abcdef0123456789abcdef"}])
def test_multi_worker_refuses_a_time_budget_and_resume(given):
    with pytest.raises(ConfigError, match="pass -P epochs=N instead of time_budget, and start again rather than"):
        train.TrainConfig(strategy="multi_worker", **given).resolved()


def start_workers(count: int, args: list[str], tracking: str, folder) -> list[subprocess.Popen]:
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(count)]}
    started = []
    for index in range(count):
        cwd = folder / f"worker{index}"
        cwd.mkdir()
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking,
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        started.append(subprocess.Popen([sys.executable, "-m", "fer_mlflow", "train", *args], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return started


@pytest.fixture
def batches_npz(tmp_path) -> str:
    """Demo data of 160 training images: five whole global batches of 32."""
    from fer_mlflow.data.demo import make_demo

    path = str(ds.save(make_demo(seed=0, per_class=33), tmp_path / "batches.npz"))
    assert len(ds.load(path).split("train")) == 160
    return path


PLAIN = {"shift": 0.0, "flip": False, "rotation": 0.0, "zoom": 0.0, "erase": 0.0, "dropout": 0.0}


def mirrored_run(data: str, tracking: str, **settings) -> str:
    """The id of a run trained in a process of its own with strategy=mirrored over two logical CPUs."""
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from fer_mlflow.stages import train
        print(train.run(train.TrainConfig(model="cnn", data={data!r}, strategy="mirrored", **{settings!r})).run_id)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()[-1]


@pytest.mark.slow
def test_two_workers_train_one_model_and_only_the_chief_logs_it(batches_npz, tracking, tmp_path):
    # A learning rate of 1e-9 leaves the weights as they start (seed 0), so each epoch's logged loss is
    # the forward pass alone: exact arithmetic to compare, not ten SGD steps that amplify rounding
    # (with the default rate the two runs below differed by 0.015% on an AVX-512 CPU and by 1.1% on
    # an AVX2 one, whose oneDNN kernels round differently).
    still = {**PLAIN, "learning_rate": 1e-9}
    options = [f"--{name.replace('_', '-')}={str(value).lower()}" for name, value in still.items()]  # no random views
    args = ["--strategy", "multi_worker", "--data", batches_npz, "--epochs", "2", "--batch-size", "32", *options]
    processes = start_workers(2, args, tracking, tmp_path)
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    (run,) = all_runs()  # the follower logged nothing to the user's store
    assert run.info.status == "FINISHED" and run.data.params["replicas"] == "2"
    assert run.data.params["strategy"] == "multi_worker"
    seen = run.data.metrics["train_images_per_second"] * run.data.metrics["train_seconds"]
    assert seen == pytest.approx(2 * 160, rel=1e-6)  # every image, each global batch split over both
    assert not any((tmp_path / "worker1").iterdir())  # nor saved anything where it ran

    # The same arithmetic in one process: MirroredStrategy over two logical CPUs also splits each
    # global batch of 32 into two halves, and each replica normalises its own 16 images, as each
    # worker does: the same losses (bit for bit on an AVX2 CPU). One replica normalises all 32 images,
    # batch statistics of another batch: 0.4% away, which the comparison must tell apart.
    alone = mirrored_run(batches_npz, tracking, epochs=2, batch_size=32, **still)
    one = train.run(train.TrainConfig(model="cnn", data=batches_npz, epochs=1, batch_size=32, **still)).run_id
    history = MlflowClient().get_metric_history
    losses = [[m.value for m in sorted(history(r, "loss"), key=lambda m: m.step)] for r in (run.info.run_id, alone, one)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[2][0] != pytest.approx(losses[1][0], rel=1e-3)
