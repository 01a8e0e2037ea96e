"""Knowledge distillation: `train -P teacher=<model>` mixes the teacher's served probabilities into
the training targets; `train -P init=<model>` starts from a logged model's weights (fine-tuning)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from conftest import tiny_keras_model
from mlflow import MlflowClient

from fer_mlflow.data import dataset as ds
from fer_mlflow.stages import ensemble, train
from fer_mlflow.tracking.registry import load_model
from fer_mlflow.serving import pyfunc_model
from fer_mlflow.serving.calibration import tempered
from fer_mlflow.cli import main
from fer_mlflow.learning.loop import soft_targets


def test_soft_targets_mix_the_softened_teacher_with_the_label():
    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([1, 2])
    targets = soft_targets(labels, teacher, alpha=0.25, temperature=2.0)
    softened = tempered(teacher, 2.0)
    assert softened[0, 0] < 0.7  # softened: the teacher's top class loses weight
    assert np.allclose(targets, 0.75 * np.eye(3)[labels] + 0.25 * softened)
    assert np.allclose(targets.sum(axis=1), 1) and targets.dtype == np.float32
    assert np.allclose(soft_targets(labels, teacher, alpha=0.0, temperature=2.0), np.eye(3)[labels])


@pytest.mark.slow
def test_a_student_trains_on_its_teachers_served_probabilities(tiny_npz, monkeypatch):
    teacher = train.run(train.TrainConfig(model="cnn", data=tiny_npz, epochs=1, batch_size=32))
    seen = {}
    original = train._fit

    def recording_fit(config, train_split, val, replicas, plan, extra=(), teaching=None, initial=None):
        seen["targets"], seen["labels"] = teaching, train_split.labels
        return original(config, train_split, val, replicas, plan, extra, teaching, initial)

    monkeypatch.setattr(train, "_fit", recording_fit)
    student = train.run(train.TrainConfig(model="cnn", data=teacher.data_uri, epochs=1, batch_size=32,
                                          teacher=teacher.model_uri, distill_alpha=0.5, distill_temperature=3.0))
    run = MlflowClient().get_run(student.run_id)
    assert run.data.tags["fer.teacher"] == teacher.model_uri
    assert run.data.tags["fer.teacher_run"] == teacher.run_id and "fer.teacher_version" not in run.data.tags
    assert run.data.params["teacher"] == teacher.model_uri and run.data.params["distill_temperature"] == "3.0"
    images = ds.load(teacher.data_uri).split("train").images
    served = pyfunc_model.predict_crops(load_model(teacher.model_uri), images)
    served = served[[c for c in served.columns if c.startswith("prob_")]].to_numpy()
    assert np.allclose(seen["targets"], soft_targets(seen["labels"], served, 0.5, 3.0), atol=1e-5)
    assert run.data.metrics["teacher_train_accuracy"] == pytest.approx(
        np.mean(served.argmax(axis=1) == seen["labels"]))


def test_a_teacher_that_cannot_be_loaded_is_one_line_and_no_run(tiny_npz, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", tiny_npz, "--epochs", "1", "--teacher", "runs:/0123456789abcdef/model"])
    assert exit_info.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "runs:/0123456789abcdef/model" in errors[0]
    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])


@pytest.mark.slow
def test_init_starts_training_from_a_logged_models_weights(tiny_npz):
    first = train.run(train.TrainConfig(model="cnn", data=tiny_npz, epochs=1, batch_size=32, widths=(8, 16)))
    # A rate of zero keeps the weights where they start: the logged network is the one it began from.
    tuned = train.run(train.TrainConfig(model="cnn", data=first.data_uri, epochs=1, batch_size=32, widths=(8, 16),
                                        init=first.model_uri, learning_rate=0.0))
    started, ended = (pyfunc_model.keras_model_of(load_model(uri)).get_weights()
                      for uri in (first.model_uri, tuned.model_uri))
    # The kernels; batch normalisation's moving statistics go on following the training batches.
    assert all(np.array_equal(a, b) for a, b in zip(started, ended) if a.ndim > 1)
    params = MlflowClient().get_run(tuned.run_id).data.params
    assert params["init"] == first.model_uri and params["weights_used"] == f"{first.model_uri} (init)"
    scratch = train.run(train.TrainConfig(model="cnn", data=first.data_uri, epochs=1, batch_size=32, widths=(8, 16),
                                          learning_rate=0.0, seed=1))
    assert not np.array_equal(pyfunc_model.keras_model_of(load_model(scratch.model_uri)).get_weights()[0], started[0])


def test_init_of_another_network_is_one_line_and_no_run(tiny_npz, capsys):
    with mlflow.start_run():  # a logged model whose network is not the cnn of widths 8,16,32
        model_uri = pyfunc_model.log_model(tiny_keras_model(0)).model_uri
    before = len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", tiny_npz, "--epochs", "1", "--widths", "8,16,32", "--init", model_uri])
    assert exit_info.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and model_uri in errors[0] and "widths 8,16,32" in errors[0]
    assert len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])) == before


@pytest.mark.slow
def test_init_takes_one_network_of_an_ensemble(tiny_npz):
    import keras

    first = train.run(train.TrainConfig(model="cnn", data=tiny_npz, epochs=1, batch_size=32, widths=(8, 16)))
    trained = pyfunc_model.keras_model_of(load_model(first.model_uri))
    other = keras.models.clone_model(trained)  # the same network, with new random weights
    with mlflow.start_run():
        pair_uri = pyfunc_model.log_model(ensemble.combine([other, trained], [0.5, 0.5])).model_uri
    tuned = train.run(train.TrainConfig(model="cnn", data=first.data_uri, epochs=1, batch_size=32, widths=(8, 16),
                                        init=f"{pair_uri}#1", learning_rate=0.0))
    ended = pyfunc_model.keras_model_of(load_model(tuned.model_uri)).get_weights()
    kernels = [(a, b) for a, b in zip(trained.get_weights(), ended) if a.ndim > 1]
    assert kernels and all(np.array_equal(a, b) for a, b in kernels)  # the second network's, not the first's
    assert MlflowClient().get_run(tuned.run_id).data.params["weights_used"] == f"{pair_uri}#1 (init)"


@pytest.mark.parametrize("suffix, problem", [("#2", "ensemble of 2 networks (#0 to #1), it has no #2"),
                                              ("#one", "not 'one'"),
                                              ("single#0", "is one network, not an ensemble: name it without #0")])
def test_init_naming_no_network_of_an_ensemble_is_one_line_and_no_run(tiny_npz, capsys, suffix, problem):
    with mlflow.start_run():
        pair_uri = pyfunc_model.log_model(ensemble.combine([tiny_keras_model(0), tiny_keras_model(1)],
                                                           [0.5, 0.5])).model_uri
        single_uri = pyfunc_model.log_model(tiny_keras_model(2), name="single").model_uri
    init = f"{single_uri}#0" if suffix.startswith("single") else f"{pair_uri}{suffix}"
    before = len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", tiny_npz, "--epochs", "1", "--init", init])
    assert exit_info.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and problem in errors[0]
    assert len(MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])) == before
