"""Training on several machines: TensorFlow's `MultiWorkerMirroredStrategy`, workers described by
the standard ``TF_CONFIG`` environment variable.

Every worker runs the same `train` command. The chief (task type ``chief``, or worker 0 when the
cluster names no chief) logs the one MLflow run; the other workers (followers) run the very same
code, so that every collective step matches, against a throw-away tracking store in a temporary
folder that is deleted at the end: they log nothing and save nothing where the user looks. A
follower started by ``mlflow run`` has its launcher's run deleted once it ends.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import mlflow
from mlflow import MlflowClient

from fer_mlflow.errors import ConfigError

EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}')
_CHOSEN = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextmanager
def keras_mended(strategy):
    """Keras 3.15's `fit`, `evaluate` and `predict` made to run under `MultiWorkerMirroredStrategy`
    for the block (keras-team/keras#20585, tensorflow/tensorflow#72388). Two places fail there:

    - building the model from the first batch reduces a structure of per-replica tensors with
      ``strategy.reduce``, which that strategy refuses: the batch's local part serves (only shapes
      and dtypes are read);
    - each step's logs are reduced with ``strategy.reduce("MEAN", value, axis=0)``, which fails on
      the scalar loss and metrics: they are averaged over the replicas (``axis=None``) instead.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(
                lambda value: strategy.reduce("MEAN", value, axis=None) if _distributed(value) else value, values)
        return reduce(values, strategy, reduction)

    def maybe_symbolic_build(model, iterator=None, data_batch=None):
        if model._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda value: model.distribute_strategy.experimental_local_results(value)[0]
                    if _distributed(value) else value, next(batches))
                break
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    with mock.patch.object(trainer, "reduce_per_replica", reduce_per_replica), \
            mock.patch.object(trainer.TensorFlowTrainer, "_maybe_symbolic_build", maybe_symbolic_build):
        yield


def _distributed(value) -> bool:
    import tensorflow as tf

    return isinstance(value, tf.distribute.DistributedValues)


def cluster() -> dict:
    """The parsed ``TF_CONFIG``; ConfigError in one line when it is missing or does not name this task."""
    text = os.environ.get("TF_CONFIG", "")
    try:
        config = json.loads(text)
        task, workers = config["task"], config["cluster"]
        if task["type"] not in workers or not 0 <= int(task["index"]) < len(workers[task["type"]]):
            raise KeyError("task")
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"strategy=multi_worker needs TF_CONFIG to describe the cluster and this worker's task "
                          f"(got {text[:80] or 'none'!r}), e.g. {EXAMPLE}") from error
    return config


def is_chief(config: dict) -> bool:
    """Whether this task logs the run: the ``chief``, or worker 0 of a cluster without one."""
    task = config["task"]
    if task["type"] == "chief":
        return True
    return "chief" not in config["cluster"] and task["type"] == "worker" and int(task["index"]) == 0


def size(config: dict) -> int:
    """How many tasks train (chief and workers)."""
    return sum(len(config["cluster"].get(kind, [])) for kind in ("chief", "worker"))


@contextmanager
def throwaway_store(data: str):
    """For a follower: MLflow pointed at a temporary store (and folder) for the block, removed after;
    yields `data` readable from there (a run's artifact downloaded first, a local path absolute)."""
    from fer_mlflow.tracking.runs import _delete_when_ended

    launched = os.environ.get("MLFLOW_RUN_ID")
    if launched:  # started by `mlflow run`: its run is not this worker's to keep
        MlflowClient().set_tag(launched, "fer.multi_worker_follower", "true")
        _delete_when_ended(launched)
    saved = {key: os.environ.get(key) for key in (*_CHOSEN, "MLFLOW_TRACKING_URI")}
    previous_uri, previous_dir = mlflow.get_tracking_uri(), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fer-follower-") as folder:
        if data.startswith(("runs:/", "models:/", "mlflow-artifacts:")):  # read through the user's store
            data = mlflow.artifacts.download_artifacts(data, dst_path=folder)
        elif "://" not in data and data != "demo":  # a local path, read from the temporary folder
            data = str(Path(data).expanduser().resolve())
        for key in _CHOSEN:
            os.environ.pop(key, None)
        uri = f"sqlite:///{folder}/follower.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        os.chdir(folder)  # the store's artifacts go under ./mlruns: here, not in the user's folder
        try:
            yield data
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            os.chdir(previous_dir)
            mlflow.set_tracking_uri(previous_uri)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
