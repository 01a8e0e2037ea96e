"""The champion can be trusted: the demo stays apart, a champion is never replaced unseen, what was
scored is what is served, a rollback sticks, two promotes at once agree, and selection can be on val."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from conftest import PROJECT, all_runs, mlflow_run, tiny_keras_model
from mlflow import MlflowClient

from fer_mlflow.stages import clean, evaluate, promote
from fer_mlflow.serving import pyfunc_model
from fer_mlflow.data import dataset as ds
from fer_mlflow.tracking.runs import DATA_EXPERIMENT, DEMO_TAG, EXPERIMENT_KIND, experiment_id
from fer_mlflow.serving.views import Settings
from fer_mlflow.errors import ConfigError

ANGRY, FEAR, HAPPY, SAD = 0, 2, 3, 4


def constant_model(label: int):
    """A model that answers `label` for every face (probability about 0.99)."""
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(0.0)(inputs))
    dense = keras.layers.Dense(7, activation="softmax")
    outputs = dense(x)
    dense.set_weights([np.zeros((48 * 48, 7)), 10.0 * np.eye(7)[label]])
    return keras.Model(inputs, outputs)


def logged(keras_model, experiment: str | None = None, name: str = "model") -> str:
    """A training-like run holding `keras_model`; returns its id."""
    with mlflow.start_run(run_name=name, experiment_id=experiment or experiment_id(DATA_EXPERIMENT)) as run:
        mlflow.set_tags({"fer.stage": "train", "fer.model": name, "fer.model_family": "cnn"})
        pyfunc_model.log_model(keras_model, name="model")
    return run.info.run_id


def labelled(tmp_path, name: str, test: dict[int, int], val: dict[int, int] | None = None) -> str:
    """A dataset file whose test (and val) split holds `count` faces of each `label` in the dicts."""
    images, labels, splits = [], [], []
    rng = np.random.default_rng(len(name))
    for split, counts in (("test", test), ("val", val or {}), ("train", {SAD: 2})):
        for label, count in counts.items():
            images += [rng.integers(40, 215, (48, 48), dtype=np.uint8) for _ in range(count)]
            labels += [label] * count
            splits += [split] * count
    ids = [f"{name}-{i}" for i in range(len(images))]
    return str(ds.save(ds.Dataset(np.stack(images), labels, splits, ids), tmp_path / f"{name}.npz"))


def champion(name="fer-emotion"):
    return MlflowClient().get_model_version_by_alias(name, "champion")


def versions(name="fer-emotion"):
    return MlflowClient().search_model_versions(f"name = '{name}'")


# --- 1. the demo stays apart -------------------------------------------------------------------


@pytest.mark.slow  # three clean runs
def test_runs_go_to_the_project_experiment_for_their_data_unless_the_user_chose_one(kaggle_folder, monkeypatch):
    client = MlflowClient()
    demo = clean.run("demo")
    real = clean.run(str(kaggle_folder))
    where = {o.run_id: client.get_experiment(client.get_run(o.run_id).info.experiment_id) for o in (demo, real)}
    assert where[demo.run_id].name == "fer-demo" and where[real.run_id].name == "fer2013"
    assert all(e.tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1] for e in where.values())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-study")  # what the user names always wins
    chosen = clean.run("demo")
    assert client.get_experiment(client.get_run(chosen.run_id).info.experiment_id).name == "my-study"
    assert not client.search_runs(["0"])  # nothing in MLflow's Default experiment


@pytest.mark.slow
def test_auto_promote_in_an_experiment_holding_demo_runs_promotes_among_the_real_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")  # the user's one experiment for everything
    data = labelled(tmp_path, "d", {HAPPY: 7, ANGRY: 3})
    on_demo = logged(constant_model(HAPPY), experiment_id("mine"), "happy-demo")
    MlflowClient().set_tag(on_demo, DEMO_TAG, "true")  # as train tags a run on the demo data
    evaluate.run(run_id=on_demo, data=data)  # 0.7, the best score, by a demo-trained model
    real = logged(constant_model(ANGRY), experiment_id("mine"), "angry")
    evaluate.run(run_id=real, data=data)  # 0.3, the newest evaluation
    outcome = promote.run()
    assert outcome.registered_model_name == "fer-emotion" and champion().run_id == real
    assert not MlflowClient().search_registered_models("name = 'fer-emotion-demo'")


@pytest.mark.slow
def test_mlflow_run_without_an_experiment_leaves_nothing_in_default(tracking):
    done = mlflow_run("promote", {"registered_model_name": "fer-emotion-demo"}, tracking)
    assert done.returncode != 0 and "no finished evaluation" in done.stderr  # nothing to promote yet
    client = MlflowClient()
    runs = [run for run in all_runs() if run.info.experiment_id != "0"]  # Default's: checked below
    assert len(runs) == 1 and runs[0].info.status == "FAILED"  # the copy fails as the stage did
    assert client.get_experiment(runs[0].info.experiment_id).name == "fer-demo"
    assert runs[0].data.params["registered_model_name"] == "fer-emotion-demo"  # the runner's params came along
    deadline = time.monotonic() + 60
    while client.search_runs(["0"]) and time.monotonic() < deadline:  # MLflow's own run, deleted once ended
        time.sleep(0.5)
    assert not client.search_runs(["0"])
    # Its artifacts sit beside Default's, in the user's folder, not in the project's (mlflow run's cwd).
    default = Path(client.get_experiment("0").artifact_location.removeprefix("file://"))
    demo = client.get_experiment_by_name("fer-demo").artifact_location.removeprefix("file://")
    assert Path(demo).parent == default.parent and PROJECT not in Path(demo).parents


# --- 2. never replace a champion unseen --------------------------------------------------------


@pytest.mark.slow  # logs and evaluates several models
def test_promote_scores_a_champion_from_another_experiment_before_replacing_it(tmp_path, monkeypatch):
    mostly_happy = labelled(tmp_path, "d2", {HAPPY: 6, ANGRY: 4})
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-a")
    happy = logged(constant_model(HAPPY), experiment_id("team-a"), "happy")
    evaluate.run(run_id=happy, data=labelled(tmp_path, "d1", {HAPPY: 5}))
    assert promote.run().changed  # v1, scored 1.0 on d1 only
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)

    angry = logged(constant_model(ANGRY), name="angry")
    assert evaluate.run(run_id=angry, data=mostly_happy).metrics["test_accuracy"] == pytest.approx(0.4)
    kept = promote.run()
    assert not kept.changed and str(champion().version) == "1"
    nested = all_runs(f"tags.`mlflow.parentRunId` = '{kept.run_id}'")
    assert len(nested) == 1 and nested[0].data.tags["fer.model_version"] == "fer-emotion/1"
    assert nested[0].data.metrics["test_accuracy"] == pytest.approx(0.6)  # the champion, seen on d2

    assert evaluate.run(model_uri="models:/fer-emotion@champion", data=mostly_happy).metrics[
        "test_accuracy"] == pytest.approx(0.6)  # a models:/ URI's score counts for that version
    assert not promote.run().changed
    assert len(all_runs("tags.`fer.stage` = 'evaluate' and tags.`fer.model_version` = 'fer-emotion/1'")) == 2


def test_a_champion_with_no_run_is_not_replaced_unscored_but_promote_says_how_to_go_on(tmp_path):
    """A champion registered by hand from a model folder names no training run to key its score by:
    promote refuses in one line, leaving the aliases, rather than take it for unscored."""
    mostly_happy = labelled(tmp_path, "d2", {HAPPY: 6, ANGRY: 4})
    pyfunc_model.save_model(constant_model(HAPPY), tmp_path / "happy_model")
    client = MlflowClient()
    client.create_registered_model("fer-emotion")
    by_hand = client.create_model_version("fer-emotion", (tmp_path / "happy_model").as_uri())
    client.set_registered_model_alias("fer-emotion", "champion", by_hand.version)
    angry = logged(constant_model(ANGRY), name="angry")
    assert evaluate.run(run_id=angry, data=mostly_happy).metrics["test_accuracy"] == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="names no training run of this store.*delete_registered_model_alias"):
        promote.run()
    assert client.get_registered_model("fer-emotion").aliases == {"champion": by_hand.version}


def test_a_champion_whose_run_was_deleted_for_good_is_named_with_what_to_do(tmp_path):
    from mlflow.tracking._tracking_service.utils import _get_store

    happy = logged(constant_model(HAPPY), name="happy")
    evaluate.run(run_id=happy, data=labelled(tmp_path, "d1", {HAPPY: 5}))
    assert promote.run().changed
    angry = logged(constant_model(ANGRY), name="angry")
    evaluate.run(run_id=angry, data=labelled(tmp_path, "d2", {HAPPY: 6, ANGRY: 4}))
    _get_store()._hard_delete_run(happy)  # what `mlflow gc` does to a deleted run
    with pytest.raises(ConfigError, match=f"models:/fer-emotion/1 .version fer-emotion/1. was trained in run {happy}, "
                                          "which .* no longer holds .*move its aliases"):
        promote.run()
    assert str(champion().version) == "1"


@pytest.mark.slow
def test_the_readme_sequence_through_mlflow_run_rescores_the_champion_and_decides(tmp_path, tracking):
    """An evaluation made by `mlflow run -e evaluate -P run_id=...` with no data records data as the
    shell quoted it (``''``): promote still scores the champion on the candidate's data."""
    only_sad = labelled(tmp_path, "d1", {SAD: 5})
    mostly_happy = labelled(tmp_path, "d2", {HAPPY: 7, SAD: 3})
    runs = {}
    for label, data in ((SAD, only_sad), (HAPPY, mostly_happy)):
        runs[label] = logged(constant_model(label), name=str(label))
        MlflowClient().log_param(runs[label], "data_uri", data)  # as train records its data
    evaluate.run(run_id=runs[SAD])  # the champion to be: evaluated as the Python API does, data ""
    assert promote.run().changed and champion().run_id == runs[SAD]
    done = mlflow_run("evaluate", {"run_id": runs[HAPPY]}, tracking)  # the candidate, through mlflow run
    assert done.returncode == 0, done.stderr[-3000:]
    (quoted,) = all_runs(f"tags.`fer.source_run` = '{runs[HAPPY]}'")
    assert quoted.data.params["data"] == "''"  # what mlflow run stores for an empty value
    decided = promote.run()
    assert decided.changed and champion().run_id == runs[HAPPY]
    assert "previous: v1 scored 0.3000" in decided.message
    (rescored,) = all_runs(f"tags.`mlflow.parentRunId` = '{decided.run_id}'")
    assert rescored.data.tags["fer.model_version"] == "fer-emotion/1"
    assert rescored.data.tags["fer.test_digest"] == quoted.data.tags["fer.test_digest"]


# --- 3. scored equals served -------------------------------------------------------------------


@pytest.mark.parametrize("settings", [[False], pytest.param([True], marks=pytest.mark.slow),
                                      pytest.param([False, True], marks=pytest.mark.slow)],
                         ids=["plain", "tta", "both"])
def test_the_registered_version_predicts_what_its_metric_says_with_no_params(settings, tmp_path):
    data = labelled(tmp_path, "faces", {label: 4 for label in range(7)})
    source = logged(tiny_keras_model(), name="cnn")
    scored = {tta: evaluate.run(run_id=source, data=data, tta=tta) for tta in settings}
    outcome = promote.run()
    version = champion()
    top = max(o.metrics["test_accuracy"] for o in scored.values())
    best = [o.settings for o in scored.values() if o.metrics["test_accuracy"] == top]
    assert version.tags["settings"] in [b.key for b in best] and version.tags["source_run"] == source
    model = mlflow.pyfunc.load_model(f"models:/fer-emotion/{version.version}")
    served = pyfunc_model.settings_of(model)
    assert served in best and served.key == version.tags["settings"]
    test = ds.load(data).split("test")
    predicted = model.predict(test.images)["label"].map(list(test.class_names).index).to_numpy()
    assert np.mean(predicted == test.labels) == pytest.approx(float(version.tags["test_accuracy"]), abs=1e-6)
    for words in ("test_accuracy", served.key, "faces.npz", source, "confusion_matrix"):
        assert words in version.description
    promote_run = MlflowClient().get_run(outcome.run_id)
    assert promote_run.data.tags["fer.registered_model"] == "fer-emotion"


def test_the_served_model_takes_its_settings_as_predict_params():
    keras_model = tiny_keras_model()
    with mlflow.start_run():
        plain = mlflow.pyfunc.load_model(pyfunc_model.log_model(keras_model, name="plain").model_uri)
        tta = mlflow.pyfunc.load_model(
            pyfunc_model.log_model(keras_model, name="tta", settings=Settings(tta=True)).model_uri)
    faces = np.random.default_rng(0).integers(0, 255, (6, 48, 48), dtype=np.uint8)
    probabilities = lambda frame: frame.filter(like="prob_").to_numpy()  # noqa: E731
    assert np.allclose(probabilities(tta.predict(faces)), probabilities(plain.predict(faces, params={"tta": True})))
    assert np.allclose(probabilities(plain.predict(faces)), probabilities(tta.predict(faces, params={"tta": False})))
    assert not np.allclose(probabilities(plain.predict(faces)), probabilities(tta.predict(faces)))
    defaults = {spec.name: spec.default for spec in tta.metadata.get_params_schema().params}
    assert defaults["tta"] is True and defaults["tta_rotation"] == 10.0  # so REST bodies take them too


# --- 4. rollback sticks ------------------------------------------------------------------------


@pytest.mark.slow  # logs and evaluates several models
def test_a_rolled_back_version_is_rejected_and_skipped_until_included(tmp_path):
    data = labelled(tmp_path, "d", {HAPPY: 7, ANGRY: 3})
    angry, happy = logged(constant_model(ANGRY), name="angry"), logged(constant_model(HAPPY), name="happy")
    evaluate.run(run_id=angry, data=data)
    promote.run()
    evaluate.run(run_id=happy, data=data)
    assert promote.run().changed and champion().run_id == happy
    rolled = promote.run(rollback=True)
    assert champion().run_id == angry
    rejected = MlflowClient().get_model_version("fer-emotion", "2")
    assert rejected.tags["rejected"] == "true" and rejected.tags["rejected_in_run"] == rolled.run_id
    assert rejected.tags["rejected_by"] and rejected.tags["rejected_at"].startswith("20")
    assert not promote.run().changed and champion().run_id == angry  # the rollback sticks
    assert promote.run(include_rejected=True).changed and champion().run_id == happy
    assert "rejected" not in MlflowClient().get_model_version("fer-emotion", "2").tags


# --- 5. two promotes at once -------------------------------------------------------------------


# Each promote process runs the CLI with its first registration and its first alias write gated:
# it waits there until every promote has arrived, so all of them have read the registry before any
# writes (the race happens every time), and then waits FER_TEST_LAG more seconds before the write.
GATED_PROMOTE = """
import functools, os, sys, time
from pathlib import Path
import mlflow
from mlflow import MlflowClient

def gated(function, gate):
    arrived = []
    @functools.wraps(function)
    def call(*args, **kwargs):
        if not arrived:
            arrived.append(True)
            folder = Path(os.environ["FER_TEST_BARRIER"]) / gate
            folder.mkdir(parents=True, exist_ok=True)
            (folder / str(os.getpid())).touch()
            deadline = time.monotonic() + 120
            while len(list(folder.iterdir())) < int(os.environ["FER_TEST_PARTIES"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(float(os.environ.get("FER_TEST_LAG", "0")))
        return function(*args, **kwargs)
    return call

mlflow.register_model = gated(mlflow.register_model, "register")
MlflowClient.set_registered_model_alias = gated(MlflowClient.set_registered_model_alias, "alias")
from fer_mlflow.cli import main
main(["promote"])
"""


def promote_together(tracking_uri: str, experiments: dict[str, float], barrier: Path) -> None:
    """One `promote` process per experiment, all reading the registry before any writes (see
    GATED_PROMOTE), each then lagging its writes by the seconds given; all must succeed."""
    processes = [subprocess.Popen([sys.executable, "-c", GATED_PROMOTE], cwd=PROJECT,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
                                       "MLFLOW_EXPERIMENT_NAME": name, "FER_TEST_BARRIER": str(barrier),
                                       "FER_TEST_PARTIES": str(len(experiments)), "FER_TEST_LAG": str(lag)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, lag in experiments.items()]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    for gate in ("register", "alias"):  # every promote reached each write having read the old state
        assert len(list((barrier / gate).iterdir())) == len(experiments)


def check_registry(best_run: str) -> None:
    sources = [v.tags.get("source_run") for v in versions()]
    assert len(sources) == len(set(sources))  # one version per source run
    assert champion().run_id == best_run
    assert str(MlflowClient().get_model_version_by_alias("fer-emotion", "previous").version) != str(champion().version)


def concurrent_promotes(tmp_path) -> None:
    """Accuracies on the data: SAD 0.1 (the first champion), ANGRY 0.2, FEAR 0.3, HAPPY 0.4."""
    data = labelled(tmp_path, "d", {HAPPY: 8, FEAR: 6, ANGRY: 4, SAD: 2})
    runs = {label: logged(constant_model(label), experiment_id("base"), str(label))
            for label in (SAD, ANGRY, FEAR, HAPPY)}
    for experiment, label in (("base", SAD), ("a", ANGRY), ("b", ANGRY), ("c", FEAR), ("d", HAPPY)):
        os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
        evaluate.run(run_id=runs[label], data=data)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "base"
    promote.run()
    promote_together(mlflow.get_tracking_uri(), {"a": 0, "b": 0}, tmp_path / "ab")  # both register one run
    check_registry(runs[ANGRY])
    # Each a different, better run; the worse writes last, so only the re-check makes HAPPY champion.
    promote_together(mlflow.get_tracking_uri(), {"c": 3, "d": 0}, tmp_path / "cd")
    check_registry(runs[HAPPY])


@pytest.mark.slow
def test_two_promotes_at_once_on_sqlite_leave_one_version_per_run_and_the_best_champion(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "base")  # cleaned up by monkeypatch after the test
    concurrent_promotes(tmp_path)


@pytest.mark.slow
def test_two_promotes_at_once_on_a_postgresql_backed_server_agree_too(tracking_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "base")
    mlflow.set_tracking_uri(tracking_server)
    concurrent_promotes(tmp_path)


# --- 6. selection on validation data -----------------------------------------------------------


@pytest.mark.slow  # logs and evaluates several models
def test_promote_can_choose_on_val_and_reports_test(tmp_path):
    data = labelled(tmp_path, "d", test={HAPPY: 6, ANGRY: 4}, val={ANGRY: 6, HAPPY: 4})
    angry, happy = logged(constant_model(ANGRY), name="angry"), logged(constant_model(HAPPY), name="happy")
    for run_id in (angry, happy):
        evaluate.run(run_id=run_id, data=data, split="val")
        evaluate.run(run_id=run_id, data=data)
    with pytest.raises(Exception, match="not one of the val split's"):
        promote.run(split="val", metric="test_accuracy")
    promote.run(split="val")
    version = champion()
    assert version.run_id == angry  # best on val (0.6), though worse on test (0.4)
    assert version.tags["split"] == "val" and version.tags["val_accuracy"] == "0.600000"
    assert version.tags["reported_test_accuracy"] == "0.400000"
    assert "chosen on validation data" in version.description
