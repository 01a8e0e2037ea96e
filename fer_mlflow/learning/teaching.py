"""What a training run learns from besides its labels: a teacher's probabilities (knowledge
distillation, ``train -P teacher=...``) and a logged model's weights (``train -P init=...``).

A distilled run logs its teacher's probabilities for the train split (``TEACHER_ARTIFACT``) and a
resumed one learns from those: a teacher named by an alias may name another version by then, and
labelling the faces again with its views takes minutes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from fer_mlflow.errors import ConfigError
from fer_mlflow.learning import models
from fer_mlflow.learning.config import TrainConfig
from fer_mlflow.learning.loop import soft_targets
from fer_mlflow.serving import pyfunc_model

log = logging.getLogger(__name__)

# The teacher's served probabilities for the train split, logged by a distilled run for its resumption.
TEACHER_ARTIFACT = "teacher/probabilities.npz"
TEACHER_RUN_TAG, TEACHER_VERSION_TAG = "fer.teacher_run", "fer.teacher_version"


def initial_weights(config: TrainConfig) -> list[np.ndarray]:
    """The weights of the network inside the logged model ``config.init``, to start training
    from; ConfigError in one line when it cannot be loaded or is not the network `config` builds."""
    initial = logged_network(config.init).get_weights()
    network = models.build_model(config.model, image_size=config.image_size, widths=config.widths,
                                 convs=config.convs, dropout=config.dropout, weights="none")
    shapes = [tuple(w.shape) for w in network.get_weights()]
    if shapes != [tuple(w.shape) for w in initial]:
        widths = (f" of widths {','.join(map(str, config.widths))} and convs {','.join(map(str, config.convs))}"
                  if config.model == "cnn" else "")
        raise ConfigError(f"init {config.init} is not the {config.model} network{widths} at {config.image_size} "
                          "pixels that this run builds; pass the model, widths, convs and image_size it was trained with")
    return initial


def logged_network(uri: str):
    """The Keras network (pixels in, probabilities out) of the logged model `uri`; with ``#k`` after the
    URI, the k-th network (from 0) of an ensemble, as its member list orders them (e.g.
    ``models:/fer-emotion@pretrained#0``: one network of the shipped pair). ConfigError in one line
    when `uri` names no such network."""
    from fer_mlflow.tracking.registry import load_model

    model_uri, index = pyfunc_model.network_number(uri)
    network = pyfunc_model.keras_model_of(load_model(model_uri))
    return network if index is None else pyfunc_model.member_network(network, index, model_uri)


def load_teacher(model_uri: str):
    """The teacher, loaded as any served model is; ConfigError in one line when it cannot be."""
    from fer_mlflow.tracking.registry import load_model

    return load_model(model_uri)


def teacher_targets(config: TrainConfig, teacher, taught: np.ndarray | None, dataset, train) -> np.ndarray:
    """Knowledge distillation: the train split's targets, each `distill_alpha` the teacher's served
    probabilities (its own views and temperature, as `predict` answers) softened by
    `distill_temperature`, and the rest the one-hot label (`loop.soft_targets`). Validation
    keeps the labels alone, so `val_accuracy` stays comparable with any other run's.

    The teacher's probabilities are logged as ``TEACHER_ARTIFACT``; a resumed run passes them back as
    `taught` (`logged_probabilities`) and learns from them, not from a new labelling: the same teacher whatever its
    URI (an alias) names by now, and none of the minutes its views take."""
    if taught is not None:
        if taught.shape != (len(train), len(dataset.class_names)):
            raise ConfigError(f"run {config.resume}'s {TEACHER_ARTIFACT} holds {taught.shape[0]} faces' probabilities, "
                              f"not its {len(train)} training faces'; start the run again as a new run")
        log.info("resuming with the teacher's probabilities logged when the run began (%s)", TEACHER_ARTIFACT)
        return soft_targets(train.labels, taught, config.distill_alpha, config.distill_temperature)
    classes = pyfunc_model.class_names_of(teacher)
    if tuple(classes) != tuple(dataset.class_names):
        raise ConfigError(f"teacher {config.teacher} predicts the classes {', '.join(classes)}, not this data's "
                          f"{', '.join(dataset.class_names)}; pass a teacher trained on the same classes")
    started = time.perf_counter()
    frame = pyfunc_model.predict_crops(teacher, train.images)
    probabilities = frame[[f"prob_{name}" for name in classes]].to_numpy().astype(np.float32)
    log.info("teacher %s labelled %d training faces in %.0f s (%s)", config.teacher, len(train),
             time.perf_counter() - started, pyfunc_model.settings_of(teacher).describe())
    mlflow.set_tags({"fer.teacher": config.teacher, **teacher_source(config.teacher, teacher)})
    mlflow.log_metric("teacher_train_accuracy", float(np.mean(probabilities.argmax(axis=1) == train.labels)))
    with tempfile.TemporaryDirectory(prefix="fer-teacher-") as folder:
        path = Path(folder) / Path(TEACHER_ARTIFACT).name
        np.savez_compressed(path, probabilities=probabilities)
        mlflow.log_artifact(str(path), str(Path(TEACHER_ARTIFACT).parent))
    return soft_targets(train.labels, probabilities, config.distill_alpha, config.distill_temperature)


def teacher_source(model_uri: str, teacher) -> dict[str, str]:
    """Which model `model_uri` named when the run began, as tags (an alias may name another version
    later): the run it was logged in (``fer.teacher_run``) and, for a registered model, its version
    (``fer.teacher_version``, ``name/version``)."""
    from fer_mlflow.tracking.registry import registered_version

    metadata = getattr(teacher, "metadata", None)
    run_id, version = (registered_version(model_uri) if model_uri.startswith("models:/")
                       else (getattr(metadata, "run_id", None), None))
    return {k: v for k, v in ((TEACHER_RUN_TAG, run_id), (TEACHER_VERSION_TAG, version)) if v}


def logged_probabilities(run_id: str, folder: Path) -> np.ndarray | None:
    """The teacher's probabilities that the stopped run `run_id` logged (`teacher_targets`),
    downloaded below `folder`; None for a run that logged none (one begun before they were logged:
    it is labelled anew)."""
    (folder / "teacher").mkdir(exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TEACHER_ARTIFACT,
                                                   dst_path=str(folder / "teacher"))
    except (MlflowException, OSError):
        log.warning("run %s logged no %s; its teacher labels the training faces again", run_id,
                    TEACHER_ARTIFACT)
        return None
    with np.load(path, allow_pickle=False) as saved:
        return saved["probabilities"]
