"""Evaluate's numbers against sklearn, and promote's registry decisions."""

from __future__ import annotations

import json
import logging

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import all_runs
from mlflow import MlflowClient
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

from fer_mlflow.data import dataset as ds
from fer_mlflow.serving.calibration import expected_calibration_error, tempered
from fer_mlflow.serving import calibration, pyfunc_model, views
from fer_mlflow.stages import evaluate, promote, train
from fer_mlflow.cli import main
from fer_mlflow.data.demo import make_demo
from fer_mlflow.serving.pyfunc_model import log_model
from fer_mlflow.tracking.runs import DATA_EXPERIMENT, experiment_id
from fer_mlflow.serving.views import Settings


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> tuple[train.TrainOutcome, str]:
    """A cnn trained for two epochs on the tiny demo data, once for the module, in a store of its own."""
    folder = tmp_path_factory.mktemp("trained")
    store = f"sqlite:///{folder}/mlflow.db"
    data = str(ds.save(make_demo(seed=0, per_class=12), folder / "tiny.npz"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # where the store's artifacts go
        patch.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        return train.run(train.TrainConfig(model="cnn", data=data, epochs=2, batch_size=32)), store


@pytest.fixture
def trained(trained_once, monkeypatch) -> train.TrainOutcome:
    """The module's trained cnn, the test working in its store (its evaluations go there too)."""
    outcome, store = trained_once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    return outcome


def artifact(run_id: str, path: str) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)


def test_evaluate_logs_metrics_that_match_sklearn_on_its_predictions(trained):
    outcome = evaluate.run(run_id=trained.run_id)
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained.run_id
    assert run.data.tags["fer.stage"] == "evaluate"
    predictions = pd.read_csv(artifact(outcome.run_id, "predictions.csv"))
    test = ds.load(trained.data_uri).split("test")  # the tiny .npz is used as it is
    assert list(predictions["id"]) == list(test.ids)
    classes = list(test.class_names)
    true = predictions["true"].map(classes.index)
    predicted = predictions["predicted"].map(classes.index)
    probs = predictions[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.array_equal(probs.argmax(axis=1), predicted)
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(accuracy_score(true, predicted))
    for average in ("macro", "weighted"):
        kwargs = {"average": average, "labels": range(7), "zero_division": 0}
        assert metrics[f"test_precision_{average}"] == pytest.approx(precision_score(true, predicted, **kwargs))
        assert metrics[f"test_recall_{average}"] == pytest.approx(recall_score(true, predicted, **kwargs))
        assert metrics[f"test_f1_{average}"] == pytest.approx(f1_score(true, predicted, **kwargs))
    matrix = json.loads(open(artifact(outcome.run_id, "confusion_matrix.json")).read())
    assert matrix["counts"] == confusion_matrix(true, predicted, labels=range(7)).tolist()
    per_class = pd.read_csv(artifact(outcome.run_id, "per_class_metrics.csv"))
    assert list(per_class["support"]) == np.bincount(true, minlength=7).tolist()
    figures = {a.path for a in MlflowClient().list_artifacts(outcome.run_id, "figures")}
    assert figures == {"figures/confusion_matrix.png", "figures/confusion_matrix_normalised.png",
                       "figures/confident_mistakes.png", "figures/reliability.png"}
    # Calibration: the served probabilities carry the training run's temperature, fitted on val.
    temperature = MlflowClient().get_run(trained.run_id).data.metrics["temperature"]
    assert metrics["test_temperature"] == pytest.approx(temperature)
    assert metrics["test_ece"] == pytest.approx(expected_calibration_error(probs, true.to_numpy()), abs=1e-4)
    untempered = tempered(probs, 1 / temperature)
    assert metrics["test_ece_untempered"] == pytest.approx(
        expected_calibration_error(untempered, true.to_numpy()), abs=1e-3)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == test.digest() == outcome.test_digest


def test_train_and_evaluate_agree_on_the_same_images(trained, tmp_path):
    """Evaluated on its own validation images, the model scores its logged best val_accuracy."""
    val = ds.load(trained.data_uri).split("val")
    as_test = ds.Dataset(val.images, val.labels, ["test"] * len(val), val.ids)
    path = ds.save(as_test, tmp_path / "val_as_test.npz")
    outcome = evaluate.run(run_id=trained.run_id, data=str(path))
    assert outcome.metrics["test_accuracy"] == pytest.approx(trained.best_val_accuracy, abs=1e-6)


@pytest.mark.slow
def test_tta_with_every_kind_off_averages_with_the_mirrored_image(trained):
    test = ds.load(trained.data_uri).split("test")
    tta = evaluate.predict_probabilities(trained.model_uri, test.images,
                                         Settings(tta=True, tta_shift=0, tta_rotation=0, tta_zoom=0))
    images = test.images.astype(np.float32)[..., None]
    assert np.allclose(tta, _mean_over_views(trained, [images]), atol=1e-6)


def _mean_over_views(trained, views):
    """What the served model answers with test-time `views`: its network's raw probabilities of each
    view and its mirror averaged, then its temperature (`calibration`) applied once."""
    served = mlflow.pyfunc.load_model(trained.model_uri)
    network = pyfunc_model.keras_model_of(served)
    raw = sum(network.predict(v, verbose=0) + network.predict(v[:, :, ::-1], verbose=0) for v in views)
    return calibration.tempered(raw / (2 * len(views)), pyfunc_model.temperature_of(served))


@pytest.mark.slow
def test_tta_averages_ten_views_the_face_rotated_and_zoomed_and_each_mirrored(trained):
    test = ds.load(trained.data_uri).split("test")
    images = test.images.astype(np.float32)[..., None]
    r, z = views.TTA_ROTATION, views.TTA_ZOOM
    expected = [images] + [views.transformed(images, degrees=d) for d in (r, -r)]
    expected += [views.transformed(images, scale=s) for s in (1 + z, 1 - z)]
    tta = evaluate.predict_probabilities(trained.model_uri, test.images, Settings(tta=True))  # the defaults
    assert np.allclose(tta, _mean_over_views(trained, expected), atol=1e-6)
    assert np.allclose(tta.sum(axis=1), 1.0, atol=1e-5)
    params = mlflow.get_run(evaluate.run(run_id=trained.run_id, tta=True).run_id).data.params
    assert (params["tta_views"], params["tta_rotation"], params["tta_zoom"]) == ("10", str(r), str(z))


@pytest.mark.slow
def test_tta_shift_adds_the_face_shifted_four_ways(trained):
    test = ds.load(trained.data_uri).split("test")
    images = test.images.astype(np.float32)[..., None]
    expected = [views.shifted(images, dy, dx) for dy, dx in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2))]
    tta = evaluate.predict_probabilities(trained.model_uri, test.images,
                                         Settings(tta=True, tta_shift=2, tta_rotation=0, tta_zoom=0))
    assert np.allclose(tta, _mean_over_views(trained, expected), atol=1e-6)


def test_transformed_rotates_anticlockwise_and_magnifies_about_the_centre():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    assert np.allclose(views.transformed(image, degrees=90)[0, ..., 0], np.rot90(image[0, ..., 0]), atol=1e-4)
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))[None, ..., None]  # value = column
    magnified = views.transformed(ramp, scale=2.0)[0, ..., 0]
    assert np.allclose(magnified[3], 3.5 + (np.arange(8) - 3.5) / 2, atol=1e-4)  # half the slope, same centre
    assert views.transformed(image) is image


def test_shifted_moves_the_face_and_repeats_the_edge_pixels():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    down = views.shifted(image, 1, 0)[0, ..., 0]
    assert down.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    left = views.shifted(image, 0, -2)[0, ..., 0]
    assert left.tolist() == [[2, 3, 3, 3], [6, 7, 7, 7], [10, 11, 11, 11], [14, 15, 15, 15]]
    assert views.shifted(image, 0, 0) is image


@pytest.mark.parametrize(("arguments", "expected"), [
    ([], "exactly one of run_id"),
    (["--model-uri", "/no/such/model", "--data", "demo"], "model /no/such/model could not be loaded"),
    (["--model-uri", "models:/fer-emotion/7", "--data", "demo"], "model models:/fer-emotion/7 not found"),
], ids=["none", "missing_path", "missing_version"])
def test_evaluate_needs_a_model(arguments, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *arguments])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and "Traceback" not in err
    assert not all_runs()  # nothing started, nothing left RUNNING


def test_the_test_digest_depends_on_the_test_images_alone(tmp_path):
    """The same test images give the same digest whatever other ids the dataset holds."""
    data = make_demo(seed=0, per_class=9)
    longer = data.ids.tolist()
    longer[int(np.flatnonzero(data.splits == "train")[0])] = "a-train-id-" + "x" * 200  # not a test image
    widened = ds.Dataset(data.images, data.labels, data.splits, longer)
    assert widened.split("test").digest() == data.split("test").digest()
    assert widened.digest() != data.digest()  # the train image's id did change


def test_digests_stored_before_ids_were_hashed_at_their_own_width_still_compare():
    """A dataset whose longest id is its split's own (every whole dataset) keeps the digest that
    earlier versions stored: the pixels, labels, splits and ids as numpy lays them out."""
    import hashlib

    whole = make_demo(seed=0, per_class=9)
    earlier = hashlib.sha256()
    for array in (whole.images, whole.labels, whole.splits, np.asarray(whole.ids.tolist(), dtype=str)):
        earlier.update(np.ascontiguousarray(array).tobytes())
    earlier.update(json.dumps(list(whole.class_names)).encode())
    assert whole.digest() == earlier.hexdigest()[:16]


# --- promote ---------------------------------------------------------------------------------


@pytest.fixture
def models_and_evaluations():
    """Three logged models (tiny, untrained) and a helper that records an evaluation of one."""
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(7, activation="softmax")(x)
    keras_model = keras.Model(inputs, outputs)
    runs = []
    experiment = experiment_id(DATA_EXPERIMENT)  # where promote looks when no experiment is chosen
    for i in range(3):
        with mlflow.start_run(run_name=f"train-{i}", experiment_id=experiment) as run:
            mlflow.set_tags({"fer.stage": "train", "fer.model": "cnn", "fer.model_family": "cnn"})
            mlflow.set_tag("fer.model_uri", log_model(keras_model, name="model").model_uri)  # as train does
            runs.append(run.info.run_id)

    def evaluation(index: int, accuracy: float, digest: str = "d1") -> str:
        with mlflow.start_run(run_name=f"evaluate-{index}", experiment_id=experiment) as run:
            mlflow.set_tags({"fer.stage": "evaluate", "fer.source_run": runs[index], "fer.test_digest": digest,
                             "fer.model_uri": f"runs:/{runs[index]}/model", "fer.model_family": "cnn",
                             "fer.settings": "tta=false", "fer.served_model_uri": f"runs:/{runs[index]}/model"})
            mlflow.log_metric("test_accuracy", accuracy)
        return run.info.run_id

    return runs, evaluation


def champion(client, name="fer-emotion"):
    return client.get_model_version_by_alias(name, "champion")


def test_promote_registers_the_best_once_and_moves_the_alias_only_when_strictly_better(
        models_and_evaluations, caplog):
    runs, evaluation = models_and_evaluations
    client = MlflowClient()
    evaluation(0, 0.50)
    evaluation(1, 0.60)
    first = promote.run()
    assert first.changed and champion(client).run_id == runs[1]
    version = champion(client)
    # registered by the training run's logged model, so MLflow has nothing to look up and warn about
    assert version.source == client.get_run(runs[1]).data.tags["fer.model_uri"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("mlflow")]
    assert version.tags["metric"] == "test_accuracy" and version.tags["test_accuracy"] == "0.600000"
    assert version.tags["test_digest"] == "d1" and version.tags["source_run"] == runs[1]
    assert version.tags["model_family"] == "cnn"

    again = promote.run()  # promoting twice changes nothing
    assert not again.changed
    assert len(client.search_model_versions("name = 'fer-emotion'")) == 1

    evaluation(2, 0.60)  # a tie is not strictly better
    assert not promote.run().changed and champion(client).run_id == runs[1]

    evaluation(0, 0.70)  # run 0, evaluated again, now wins
    assert promote.run().changed and champion(client).run_id == runs[0]
    assert client.get_model_version_by_alias("fer-emotion", "previous").run_id == runs[1]
    assert len(client.search_model_versions("name = 'fer-emotion'")) == 2

    rolled = promote.run(rollback=True)
    assert rolled.changed and champion(client).run_id == runs[1]


def test_promote_compares_on_one_test_digest(models_and_evaluations):
    runs, evaluation = models_and_evaluations
    evaluation(0, 0.90, digest="other")
    evaluation(1, 0.40, digest="d1")
    promote.run(test_digest="d1")
    assert champion(MlflowClient()).run_id == runs[1]  # 0.90 was on other test data


def test_a_failed_promote_leaves_the_registry_untouched(models_and_evaluations, capsys):
    runs, evaluation = models_and_evaluations
    evaluation(0, 0.5)
    promote.run()
    before = [(v.version, v.aliases) for v in MlflowClient().search_model_versions("name = 'fer-emotion'")]
    with pytest.raises(SystemExit):
        main(["promote", "--metric", "test_nonexistent"])
    assert "no finished evaluation with metric test_nonexistent" in capsys.readouterr().err
    after = [(v.version, v.aliases) for v in MlflowClient().search_model_versions("name = 'fer-emotion'")]
    assert after == before
    failed = all_runs("tags.`fer.stage` = 'promote'", order_by=["start_time DESC"])
    assert failed[0].info.status == "FAILED"


def test_the_demo_data_trained_champion_loads_and_predicts(models_and_evaluations):
    runs, evaluation = models_and_evaluations
    evaluation(2, 0.3)
    promote.run()
    model = mlflow.pyfunc.load_model("models:/fer-emotion@champion")
    frame = model.predict(make_demo(per_class=9).images[:4])
    assert list(frame.columns[7:9]) == ["label", "probability"] and len(frame) == 4
