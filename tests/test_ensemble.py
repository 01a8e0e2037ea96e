"""The ensemble stage: one served model averaging trained models, and its refusals."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import all_runs, mlflow_run, tiny_keras_model
from mlflow import MlflowClient
from skimage import data as photos

from fer_mlflow.data import dataset as ds
from fer_mlflow.stages import ensemble, evaluate, promote, train
from fer_mlflow.serving.calibration import fit_temperature, tempered
from fer_mlflow.cli import main
from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.data.demo import make_demo
from fer_mlflow.errors import ConfigError, DataError
from fer_mlflow.serving.faces import MAX_FACES, MIN_FACE, face_crops
from fer_mlflow.serving import pyfunc_model, runtime
from fer_mlflow.serving.pyfunc_model import keras_model_of, log_model, runtime_of
from fer_mlflow.serving.views import Settings
from fer_mlflow.serving.views import probabilities as views_of
from fer_mlflow.tracking.runs import DEMO_EXPERIMENT, DEMO_TAG, experiment_id

PROBABILITIES = [f"prob_{name}" for name in CLASS_NAMES]


def probabilities(frame: pd.DataFrame) -> np.ndarray:
    return frame[PROBABILITIES].to_numpy()


def logged_training_run(data_uri: str, seed: int = 0, class_names=CLASS_NAMES, score: float = 0.5) -> str:
    """A finished run that looks to the stage like a training run on `data_uri`: the tiny model of
    `seed` logged as the project logs a trained one, and the tags and params train writes."""
    with mlflow.start_run(experiment_id=experiment_id(DEMO_EXPERIMENT)) as run:
        info = log_model(tiny_keras_model(seed), class_names=class_names)
        mlflow.set_tags({"fer.stage": "train", "fer.model": "tiny", "fer.model_uri": info.model_uri,
                         "fer.data_digest": ds.load(data_uri).digest(), "fer.data": "demo"})
        mlflow.log_params({"data_uri": data_uri})
        mlflow.log_metric("best_val_accuracy", score)
    return run.info.run_id


def logged_shipped_run(data_uri: str, seed: int = 0) -> str:
    """A finished run that looks to the stage like one the ``pretrained`` stage logged for a shipped
    model trained on the data of `data_uri`, in a store not this one (its data_uri cannot be read)."""
    with mlflow.start_run(experiment_id=experiment_id(DEMO_EXPERIMENT)) as run:
        info = log_model(tiny_keras_model(seed))
        mlflow.set_tags({"fer.stage": "pretrained", "fer.model": "tiny", "fer.model_uri": info.model_uri,
                         "fer.data_digest": ds.load(data_uri).digest(), "fer.data": "demo"})
        mlflow.log_params({"data_uri": "runs:/0123456789abcdef0123456789abcdef/dataset/dataset.npz"})
    return run.info.run_id


@pytest.mark.slow
def test_a_shipped_models_run_joins_a_training_run_on_its_data(tiny_npz):
    shipped, trained = logged_shipped_run(tiny_npz, 0), logged_training_run(tiny_npz, 1)
    outcome = ensemble.run(runs=f"{shipped},{trained}")
    assert outcome.members == [shipped, trained]
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.params["data_uri"] == tiny_npz  # the validation split of the training run's data
    val = ds.load(tiny_npz).split("val")
    mean = np.mean([views_of(keras_model_of(member_model(r)), val.images[..., np.newaxis].astype(np.float32),
                             Settings()) for r in (shipped, trained)], axis=0)
    assert run.data.metrics["val_accuracy"] == pytest.approx(np.mean(mean.argmax(1) == val.labels))
    other = logged_shipped_run(tiny_npz, 2)
    with pytest.raises(ConfigError, match="every member is a shipped model's run; give the data to weigh and "
                                          r"score them on, -P data=runs:/<clean run>/dataset/dataset.npz"):
        ensemble.run(runs=f"{shipped},{other}")

    # Shipped models alone, on the data they were trained on: as the shipped pair becomes an 8-bit ensemble.
    runs_before = len(all_runs())
    elsewhere = ds.save(make_demo(seed=5, per_class=12), Path(tiny_npz).with_name("other.npz"))
    with pytest.raises(DataError, match=f"data {elsewhere} is data .*, not the members' {ds.load(tiny_npz).digest()}; "
                                        "give the dataset they were trained on"):
        ensemble.run(runs=f"{shipped},{other}", data=str(elsewhere))
    assert len(all_runs()) == runs_before  # refused before any run
    alone = ensemble.run(runs=f"{shipped},{other}", data=tiny_npz, precision="int8")
    run = MlflowClient().get_run(alone.run_id)
    assert run.data.params["data_uri"] == tiny_npz and run.data.params["precision_resolved"] == "int8"
    served = mlflow.pyfunc.load_model(alone.model_uri)
    assert runtime_of(served) == "onnxruntime int8"


def test_one_network_of_a_shipped_ensemble_joins_a_training_run_without_the_rest(tiny_npz):
    with mlflow.start_run(experiment_id=experiment_id(DEMO_EXPERIMENT)) as shipped:  # a shipped pair's run
        info = log_model(ensemble.combine([tiny_keras_model(0), tiny_keras_model(1)], [0.5, 0.5]))
        mlflow.set_tags({"fer.stage": "pretrained", "fer.model": "ensemble", "fer.model_uri": info.model_uri,
                         "fer.data_digest": ds.load(tiny_npz).digest(), "fer.data": "demo"})
    pair, trained = shipped.info.run_id, logged_training_run(tiny_npz, 2)
    outcome = ensemble.run(runs=f"{pair}#1,{trained}")
    assert outcome.members == [f"{pair}#1", trained]
    networks = [layer for layer in keras_model_of(member_model(outcome.run_id)).layers
                if isinstance(layer, type(tiny_keras_model(0)))]
    second, third = tiny_keras_model(1).get_weights(), tiny_keras_model(2).get_weights()
    assert len(networks) == 2  # the pair's second network and the trained one, not the pair's first
    assert all(np.array_equal(a, b) for a, b in zip(networks[0].get_weights(), second))
    assert all(np.array_equal(a, b) for a, b in zip(networks[1].get_weights(), third))
    params = MlflowClient().get_run(outcome.run_id).data.params
    assert params["members"] == f"{pair}#1,{trained}" and params["member_0_run"] == pair
    assert params["member_0_model_uri"] == f"{info.model_uri}#1" and params["member_0_model"] == "ensemble#1"
    runs_before = len(all_runs())
    for runs, problem in ((f"{pair}#2,{trained}", "is an ensemble of 2 networks (#0 to #1), it has no #2"),
                          (f"{pair},{trained}#0", "is one network, not an ensemble: name it without #0"),
                          (f"{pair}#x,{trained}", "not 'x'"), (f"{pair}#\u00b2,{trained}", "not '\u00b2'"),
                          (f"{pair}#1,{pair}#01,{trained}", f"run {pair}#1 is named twice")):
        with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            ensemble.run(runs=runs)
    assert len(all_runs()) == runs_before  # refused before any run


def member_model(run_id: str) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(f"runs:/{run_id}/model")


@pytest.fixture
def trained_pair(tiny_npz) -> list[str]:
    """Two cnns trained for one epoch on the same tiny dataset, with different seeds."""
    return [train.run(train.TrainConfig(model="cnn", data=tiny_npz, epochs=1, batch_size=32, seed=seed)).run_id
            for seed in (0, 1)]


def test_fitted_weights_favour_the_informative_member_and_lower_the_log_loss():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 500)
    informative = np.full((500, 7), 0.3 / 6)
    informative[np.arange(500), labels] = 0.7
    noise = rng.dirichlet(np.ones(7), 500)
    weights = ensemble.fit_weights([noise, informative], labels)
    assert weights.sum() == pytest.approx(1) and (weights >= 0).all()
    assert weights[1] > 0.8
    fitted = np.tensordot(weights, np.stack([noise, informative]), axes=1)
    equal = (noise + informative) / 2
    assert ensemble.log_loss(fitted, labels) < ensemble.log_loss(equal, labels)


def test_the_log_loss_of_a_mean_of_float32_members_is_that_of_its_rows_made_whole_without_a_warning():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    whole = rng.dirichlet(np.ones(7), 200)
    members = [whole.astype(np.float32), whole.astype(np.float32)]  # rows off one by float32 rounding
    rounded = np.tensordot(np.array([0.5, 0.5]), np.stack(members), axes=1)  # float64, as ensemble weighs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn warns that such rows are not probabilities
        assert ensemble.log_loss(rounded, labels) == pytest.approx(ensemble.log_loss(whole, labels), rel=1e-5)


def test_the_combined_keras_model_is_the_weighted_sum_of_its_members_and_saves(tmp_path):
    import keras

    members = [tiny_keras_model(0), tiny_keras_model(1)]
    pixels = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 1)).astype(np.float32)
    expected = 0.25 * members[0].predict(pixels, verbose=0) + 0.75 * members[1].predict(pixels, verbose=0)
    combined = ensemble.combine(members, [0.25, 0.75])
    combined.save(tmp_path / "ensemble.keras")
    loaded = keras.models.load_model(tmp_path / "ensemble.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), expected, atol=1e-6)


@pytest.mark.slow
def test_an_ensemble_of_two_trained_cnns_predicts_the_mean_of_their_probabilities(trained_pair, tiny_npz):
    outcome = ensemble.run(runs=",".join(trained_pair))
    run = MlflowClient().get_run(outcome.run_id)
    tags, params = run.data.tags, run.data.params
    assert run.info.status == "FINISHED"
    assert tags["fer.stage"] == "ensemble" and tags["fer.model"] == "ensemble"
    assert tags["fer.members"] == ",".join(trained_pair)
    digest = ds.load(tiny_npz).digest()
    assert tags["fer.data_digest"] == digest and params["data_uri"] == tiny_npz
    for index, member in enumerate(trained_pair):
        assert params[f"member_{index}_run"] == member
        assert params[f"member_{index}_model"] == "cnn"
        assert params[f"member_{index}_data_digest"] == digest
        assert float(params[f"member_{index}_weight"]) == pytest.approx(0.5)
        assert member in tags["mlflow.note.content"]
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {ds.load(tiny_npz).split("val").digest()}

    model = mlflow.pyfunc.load_model(outcome.model_uri)
    members = [member_model(run_id) for run_id in trained_pair]
    val = ds.load(tiny_npz).split("val")
    # The members' networks' raw probabilities averaged, then the ensemble's own temperature, fitted
    # on val. (From the networks, not by undoing the members' temperatures: a tiny model's fitted
    # temperature can sharpen its answers below what float probabilities hold.)
    temperature = run.data.metrics["temperature"]
    networks = [keras_model_of(m) for m in members]

    def mean_of_raw(pixels: np.ndarray, settings: Settings = Settings()) -> np.ndarray:
        crops = pixels.astype(np.float32)[..., np.newaxis]
        return sum(views_of(n, crops, settings) for n in networks) / 2

    mean = mean_of_raw(val.images)
    # The members answer through onnxruntime, the networks here through Keras (equal to 1e-5); the
    # log-loss of a one-epoch model is flat around its temperature, so T itself agrees to 1%.
    assert temperature == pytest.approx(fit_temperature(mean, val.labels), rel=1e-2)
    np.testing.assert_allclose(probabilities(model.predict(val.images)), tempered(mean, temperature), atol=1e-5)
    labels_right = np.mean(mean.argmax(axis=1) == val.labels)
    assert run.data.metrics["val_accuracy"] == pytest.approx(labels_right)
    assert run.data.metrics["best_val_accuracy"] == run.data.metrics["val_accuracy"]

    # Test-time views and photos take the single model's path: each view through every member.
    found_views = probabilities(model.predict(val.images[:4], params={"tta": True}))
    np.testing.assert_allclose(found_views, tempered(mean_of_raw(val.images[:4], Settings(tta=True)), temperature),
                               atol=1e-5)
    photo = pd.DataFrame({"image": [_png(photos.astronaut())]})
    found = model.predict(photo, params={"detector": "haar"})
    assert (found["face"] >= 0).sum() == 1
    each = [m.predict(photo, params={"detector": "haar"}) for m in members]
    assert found[["x", "y", "w", "h"]].equals(each[0][["x", "y", "w", "h"]])
    crops, _ = face_crops([photos.astronaut()], "haar", "mtcnn", MIN_FACE, MAX_FACES)
    np.testing.assert_allclose(probabilities(found), tempered(mean_of_raw(crops), temperature), atol=1e-5)


def _png(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_evaluate_and_promote_take_an_ensemble_like_any_model(tiny_npz):
    members = [logged_training_run(tiny_npz, seed) for seed in (0, 1)]
    outcome = ensemble.run(runs=",".join(members), weights="3,1")
    assert outcome.weights == pytest.approx([0.75, 0.25])
    scored = evaluate.run(run_id=outcome.run_id)
    evaluation = MlflowClient().get_run(scored.run_id)
    assert evaluation.data.tags["fer.source_run"] == outcome.run_id
    assert evaluation.data.tags["fer.model"] == "ensemble"
    promoted = promote.run(registered_model_name="fer-emotion-demo")
    champion = mlflow.pyfunc.load_model(f"models:/{promoted.registered_model_name}@champion")
    version = MlflowClient().get_model_version_by_alias(promoted.registered_model_name, "champion")
    assert version.tags["source_run"] == outcome.run_id and version.tags["model"] == "ensemble"
    test = ds.load(tiny_npz).split("test")
    expected = sum(w * probabilities(member_model(r).predict(test.images)) for w, r in zip((0.75, 0.25), members))
    temperature = MlflowClient().get_run(outcome.run_id).data.metrics["temperature"]
    np.testing.assert_allclose(probabilities(champion.predict(test.images)), tempered(expected, temperature),
                               atol=1e-5)


@pytest.mark.slow
def test_an_int8_ensemble_serves_its_8_bit_network_and_its_figures_are_that_networks(tiny_npz, monkeypatch,
                                                                                      caplog):
    members = [logged_training_run(tiny_npz, seed) for seed in (0, 1)]
    with caplog.at_level(logging.INFO):
        outcome = ensemble.run(runs=",".join(members), precision="int8")
    assert not [r for r in caplog.records if r.name.startswith("onnxruntime")]  # the quantizer's lines kept off
    run = MlflowClient().get_run(outcome.run_id)
    assert (run.data.params["precision"], run.data.params["precision_resolved"]) == ("int8", "int8")
    model = mlflow.pyfunc.load_model(outcome.model_uri)
    assert runtime_of(model) == "onnxruntime int8"
    val = ds.load(tiny_npz).split("val")
    served = probabilities(model.predict(val.images))
    temperature = run.data.metrics["temperature"]
    exact = tempered(sum(probabilities(member_model(r).predict(val.images)) for r in members) / 2, temperature)
    # 8-bit arithmetic: near the float32 answer, not equal to it, and the class of nearly every face kept
    assert 1e-4 < np.abs(served - exact).max() < 0.2
    assert np.mean(served.argmax(1) == exact.argmax(1)) >= 0.95
    # the run's figures are those of the network it serves
    assert run.data.metrics["val_accuracy"] == pytest.approx(np.mean(served.argmax(1) == val.labels))
    assert run.data.params["network_precision"] == "int8" and "8-bit" in run.data.tags["mlflow.note.content"]
    # scored with other views, it is logged again with the same 8-bit network
    test = ds.load(tiny_npz).split("test")
    scored = evaluate.run(run_id=outcome.run_id, tta=True)
    again = mlflow.pyfunc.load_model(scored.served_model_uri)
    assert runtime_of(again) == "onnxruntime int8"
    with_views = probabilities(model.predict(test.images, params={"tta": True}))
    np.testing.assert_allclose(probabilities(again.predict(test.images)), with_views, atol=1e-6)
    assert scored.metrics["test_accuracy"] == pytest.approx(np.mean(with_views.argmax(1) == test.labels))

    # an 8-bit network that disagrees with the float32 one more than allowed is not served
    monkeypatch.setattr(runtime, "INT8_AGREEMENT", 1.01)
    exports = []

    def counted(*args, real=runtime.export_onnx):
        exports.append(args)
        return real(*args)

    monkeypatch.setattr(runtime, "export_onnx", counted)
    monkeypatch.setattr(pyfunc_model, "export_onnx", counted)
    refused = ensemble.run(runs=",".join(members), precision="int8")
    assert len(exports) == 1  # the float32 export it quantized is the one it serves, not made again
    assert MlflowClient().get_run(refused.run_id).data.params["precision_resolved"] == "float32"
    fallback = mlflow.pyfunc.load_model(refused.model_uri)
    assert runtime_of(fallback) == "onnxruntime"
    np.testing.assert_allclose(probabilities(fallback.predict(val.images)),
                               tempered(sum(probabilities(member_model(r).predict(val.images)) for r in members) / 2,
                                        MlflowClient().get_run(refused.run_id).data.metrics["temperature"]),
                               atol=1e-5)


@pytest.mark.slow
def test_fitted_weights_are_logged_and_used(tiny_npz):
    members = [logged_training_run(tiny_npz, seed) for seed in (0, 1, 2)]
    outcome = ensemble.run(runs=",".join(members), weights="fitted")
    params = MlflowClient().get_run(outcome.run_id).data.params
    assert sum(outcome.weights) == pytest.approx(1)
    assert [float(params[f"member_{i}_weight"]) for i in range(3)] == pytest.approx(outcome.weights, abs=1e-6)
    val = ds.load(tiny_npz).split("val")
    expected = sum(w * probabilities(member_model(r).predict(val.images)) for w, r in zip(outcome.weights, members))
    model = mlflow.pyfunc.load_model(outcome.model_uri)
    metrics = MlflowClient().get_run(outcome.run_id).data.metrics  # members at temperature 1: raw = served
    np.testing.assert_allclose(probabilities(model.predict(val.images)), tempered(expected, metrics["temperature"]),
                               atol=1e-5)
    equal = sum(probabilities(member_model(r).predict(val.images)) for r in members) / 3
    assert metrics["val_log_loss"] <= ensemble.log_loss(equal, val.labels) + 1e-6


@pytest.mark.slow
def test_top_takes_the_best_runs_on_the_newest_runs_data(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", DEMO_EXPERIMENT)
    other = str(ds.save(ds.load(tiny_npz).subset(slice(0, 60)), tmp_path / "other.npz"))
    worst, best, middle = (logged_training_run(tiny_npz, seed, score=s) for seed, s in ((0, 0.3), (1, 0.9), (2, 0.6)))
    logged_training_run(other, 3, score=0.99)  # the best score, but the newest run is on other data
    with pytest.raises(ConfigError, match="fewer than top=2"):
        ensemble.run(top=2)
    outcome = ensemble.run(top=2, data_digest=ds.load(tiny_npz).digest())
    assert outcome.members == [best, middle]
    # The data given chooses the runs trained on it, and is what they are weighed on.
    given = ensemble.run(top=2, data=tiny_npz)
    assert given.members == [best, middle]
    assert MlflowClient().get_run(given.run_id).data.params["data_uri"] == tiny_npz
    runs_before = len(all_runs())
    with pytest.raises(ConfigError, match=f"data {other} is data .*, not data_digest=.*; give one of the two"):
        ensemble.run(top=2, data=other, data_digest=ds.load(tiny_npz).digest())
    assert len(all_runs()) == runs_before  # refused before any run


@pytest.mark.slow
def test_top_never_mixes_demo_trained_runs_with_others(tiny_npz, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", DEMO_EXPERIMENT)  # where logged_training_run logs
    on_demo = logged_training_run(tiny_npz, 0, score=0.9)
    MlflowClient().set_tag(on_demo, DEMO_TAG, "true")  # the same images, read as the demo's dataset
    real = [logged_training_run(tiny_npz, seed, score=s) for seed, s in ((1, 0.4), (2, 0.3))]
    for run_id in real:
        MlflowClient().set_tag(run_id, DEMO_TAG, "false")
    outcome = ensemble.run(top=2)
    assert outcome.members == real
    assert MlflowClient().get_run(outcome.run_id).data.tags[DEMO_TAG] == "false"


@pytest.mark.slow  # logs five models: keeps -m 'not slow' under 3 minutes
def test_bad_members_are_refused_in_one_line_before_any_run(tiny_npz, tmp_path, capsys):
    first, second = (logged_training_run(tiny_npz, seed) for seed in (0, 1))
    other = str(ds.save(ds.load(tiny_npz).subset(slice(0, 60)), tmp_path / "other.npz"))
    cases = {
        "members were trained on different data": ["--runs", f"{first},{logged_training_run(other, 2)}"],
        "members predict different classes":
            ["--runs", f"{first},{logged_training_run(tiny_npz, 3, class_names=CLASS_NAMES[::-1])}"],
        "is not a finished training run":
            ["--runs", f"{first},{evaluate.run(model_uri=f'runs:/{first}/model', data=tiny_npz).run_id}"],
        "is named twice": ["--runs", f"{first},{first}"],
        "needs 2 or more members, got 1": ["--runs", first],
        "is not equal, fitted or 2 non-negative numbers": ["--runs", f"{first},{second}", "--weights", "1,2,3"],
        "2 non-negative numbers separated by commas": ["--runs", f"{first},{second}", "--weights", "1e308,1e308"],
        "not both": ["--runs", f"{first},{second}", "--top", "2"],
        "'int16' is not one of 'float32', 'int8'": ["--runs", f"{first},{second}", "--precision", "int16"],
    }
    before = {r.info.run_id for r in all_runs()}
    capsys.readouterr()
    for message, args in cases.items():
        with pytest.raises(SystemExit) as stopped:
            main(["ensemble", *args])
        assert stopped.value.code == 2
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert message in error
    assert {r.info.run_id for r in all_runs()} == before  # nothing started
    from fer_mlflow import cli

    assert tuple(cli.PRECISIONS.choices) == ensemble.PRECISIONS  # the command line offers what the stage takes


def test_main_refuses_an_ensemble_of_one_model_before_any_run(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["main", "--models", "cnn", "--ensemble", "true"])
    assert stopped.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "ensemble=true needs two or more models" in error
    assert not all_runs()


@pytest.mark.slow
def test_mlflow_run_builds_an_ensemble_and_refuses_a_lone_member(tiny_npz, tracking):
    members = [logged_training_run(tiny_npz, seed) for seed in (0, 1)]
    done = mlflow_run("ensemble", {"runs": ",".join(members)}, tracking)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = all_runs("tags.`fer.stage` = 'ensemble'")
    assert built.info.status == "FINISHED" and built.data.params["runs"] == ",".join(members)
    assert built.data.tags["fer.members"] == ",".join(members)
    refused = mlflow_run("ensemble", {"runs": members[0]}, tracking)
    assert refused.returncode != 0
    assert "error: an ensemble needs 2 or more members, got 1" in refused.stderr
    assert not all_runs("attributes.status = 'RUNNING'")
