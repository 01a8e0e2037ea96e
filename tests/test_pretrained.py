"""The shipped model: its file and record, the `pretrained` stage, and `predict` with no registry."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image
from skimage import data as photos

from conftest import SHARED_ZIP, all_runs, refused, tiny_keras_model
from fer_mlflow.stages import evaluate, predict, promote
from fer_mlflow.stages import pretrained as pretrained_stage
from fer_mlflow import pretrained
from fer_mlflow.serving import pyfunc_model
from fer_mlflow.cli import main
from fer_mlflow.errors import ConfigError, RegistryError
from fer_mlflow.tracking.runs import DATA_MODEL, experiment_id
from fer_mlflow.tracking.registry import load_model as registry_load

RECORD = pretrained.record()
TEST = RECORD["evaluation"]


def curves(record: dict) -> dict[str, int]:
    """The per-epoch validation curve the `pretrained` stage logs for a shipped record, by metric name,
    with its number of epochs: one network's ``val_accuracy``, or each ensemble member's."""
    if record["training"].get("members"):
        return {f"member_{i}/val_accuracy": member["epochs"] for i, member in enumerate(pretrained.networks(record))}
    return {"val_accuracy": record["training"]["epochs"]}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """The served copy of the shipped model goes to the test's own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("variant", pretrained.VARIANTS)
def test_the_shipped_file_is_the_recorded_one_and_small_enough_for_a_wheel(variant):
    RECORD, TEST = pretrained.record(variant), pretrained.record(variant)["evaluation"]
    path = pretrained.model_file(variant)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == RECORD["sha256"]
    assert path.stat().st_size <= 15 * 2**20
    made, training = RECORD["made"], RECORD["training"]
    assert made["commit"] and made["commands"] and training["data_digest"] and training["minutes"] > 0
    assert all(len(block["history"]["val_accuracy"]) == block["epochs"] > 0 for block in pretrained.networks(RECORD))
    assert training["epochs"] == sum(block["epochs"] for block in pretrained.networks(RECORD))
    # The serving choice was made on validation data: the chosen settings scored best there, of those
    # considered (a variant made for speed serves the face alone).
    choices = RECORD["validation"]["choices"]
    considered = RECORD["validation"].get("considered", list(choices))
    assert RECORD["validation"]["chosen"] == max(considered, key=lambda k: choices[k]["val_accuracy"])
    counts = np.array(TEST["confusion_matrix"])
    assert counts.sum() == TEST["images"]
    assert np.trace(counts) / counts.sum() == pytest.approx(TEST["metrics"]["test_accuracy"])


def test_a_changed_shipped_file_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    shutil.copytree(pretrained.FILES / pretrained.DEFAULT_VARIANT, tmp_path / pretrained.DEFAULT_VARIANT)
    damaged = tmp_path / pretrained.DEFAULT_VARIANT / "model.keras"
    with damaged.open("r+b") as file:
        file.seek(1000)
        byte = file.read(1)
        file.seek(1000)
        file.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(pretrained, "FILES", tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["pretrained"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "not the recorded" in error and "reinstall" in error
    assert all(r.info.status != "RUNNING" for r in all_runs())


@pytest.mark.slow
def test_pretrained_registers_the_shipped_model_once_as_served():
    first = pretrained_stage.run()
    assert first.version == "1" and first.champion
    client = MlflowClient()
    version = client.get_model_version_by_alias(DATA_MODEL, pretrained.ALIAS)
    assert str(version.version) == "1" and "champion" in version.aliases
    assert f"{TEST['metrics']['test_accuracy']:.4f}" in version.description
    run = client.get_run(first.run_id)
    assert run.data.tags[pretrained.SHA_TAG] == RECORD["sha256"]
    assert run.data.tags["fer.data_digest"] == RECORD["training"]["data_digest"]
    assert client.get_experiment(run.info.experiment_id).name == "fer2013"
    for key, epochs in curves(RECORD).items():
        assert len(client.get_metric_history(first.run_id, key)) == epochs

    again = pretrained_stage.run()
    assert (again.version, again.run_id) == ("1", first.run_id) and "nothing new" in again.message
    assert len(client.search_model_versions(f"name = '{DATA_MODEL}'")) == 1

    served = mlflow.pyfunc.load_model(f"models:/{DATA_MODEL}@champion")
    assert pyfunc_model.temperature_of(served) == pytest.approx(RECORD["temperature"])
    assert pyfunc_model.settings_of(served).key == RECORD["validation"]["chosen"]
    crops = np.random.default_rng(0).integers(0, 256, (3, 48, 48)).astype(np.uint8)
    np.testing.assert_allclose(evaluate.predict_probabilities(f"models:/{DATA_MODEL}@pretrained", crops),
                               evaluate.predict_probabilities(f"runs:/{first.run_id}/model", crops), atol=1e-6)


def test_a_rerun_takes_up_the_version_a_registry_failure_left_and_restores_a_removed_champion(monkeypatch):
    """The registry failing after the version is registered ends the run FAILED; run again, the stage
    takes that version up rather than registering a second, and a champion alias removed since is
    given back (there is none, so the shipped model is it by promote's rules)."""
    from mlflow.exceptions import MlflowException

    set_alias = pretrained_stage._set_alias
    monkeypatch.setattr(pretrained_stage, "_set_alias", lambda *args: (_ for _ in ()).throw(
        MlflowException("simulated: the server answered 503", error_code="TEMPORARILY_UNAVAILABLE")))
    with pytest.raises(RegistryError, match="run it again once it answers"):
        pretrained_stage.run(variant="fast")
    monkeypatch.setattr(pretrained_stage, "_set_alias", set_alias)
    client = MlflowClient()
    again = pretrained_stage.run(variant="fast")
    assert again.version == "1" and len(client.search_model_versions(f"name = '{DATA_MODEL}'")) == 1
    assert str(client.get_model_version_by_alias(DATA_MODEL, "pretrained-fast").version) == "1"

    client.delete_registered_model_alias(DATA_MODEL, "champion")
    restored = pretrained_stage.run(variant="fast")
    assert restored.version == "1" and restored.champion
    assert str(client.get_model_version_by_alias(DATA_MODEL, "champion").version) == "1"
    assert len(client.search_model_versions(f"name = '{DATA_MODEL}'")) == 1
    assert "nothing new" in pretrained_stage.run(variant="fast").message


@pytest.mark.slow  # two processes, each logging the fast variant
def test_two_pretrained_commands_at_once_register_the_file_once(tmp_path, tracking):
    """Both commands log their run and evaluation before either registers (the registration gated as
    in test_champion's concurrent promotes): the later version is deleted again, its aliases moved."""
    import os
    import subprocess
    import sys

    from conftest import PROJECT
    from test_champion import GATED_PROMOTE

    script = GATED_PROMOTE.replace('main(["promote"])', 'main(["pretrained", "--variant", "fast"])')
    processes = [subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": tracking, "FER_TEST_PARTIES": "2",
                                       "FER_TEST_BARRIER": str(tmp_path / "barrier")})
                 for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    assert len(list((tmp_path / "barrier" / "register").iterdir())) == 2  # both registered, neither saw the other
    client = MlflowClient()
    registered = client.search_model_versions(f"name = '{DATA_MODEL}'")
    assert len(registered) == 1
    assert client.get_registered_model(DATA_MODEL).aliases == {"champion": registered[0].version,
                                                               "pretrained-fast": registered[0].version}


@pytest.mark.slow
def test_the_fast_variant_registers_beside_the_accurate_one_under_its_own_alias():
    accurate = pretrained_stage.run()
    fast = pretrained_stage.run(variant="fast")
    client = MlflowClient()
    assert fast.version != accurate.version and "pretrained-fast" in fast.message
    assert str(client.get_model_version_by_alias(DATA_MODEL, "pretrained-fast").version) == fast.version
    assert str(client.get_model_version_by_alias(DATA_MODEL, "pretrained").version) == accurate.version
    # champion by promote's rules: the better of the two on the same PublicTest
    scores = {v: pretrained.record(v)["evaluation"]["metrics"]["test_accuracy"] for v in pretrained.VARIANTS}
    assert fast.champion == (scores["fast"] > scores["accurate"])
    assert client.get_run(fast.run_id).data.tags[pretrained.SHA_TAG] == pretrained.record("fast")["sha256"]
    again = pretrained_stage.run(variant="fast")
    assert again.version == fast.version and "nothing new" in again.message
    served = mlflow.pyfunc.load_model(f"models:/{DATA_MODEL}@pretrained-fast")
    assert not pyfunc_model.settings_of(served).tta  # made for speed: the face alone


def _champion_scoring(score: float) -> str:
    """Registers a tiny model as champion of `DATA_MODEL` with `score` on the shipped model's test data."""
    with mlflow.start_run(experiment_id=experiment_id("fer2013")) as trained:
        info = pyfunc_model.log_model(tiny_keras_model(0))
        mlflow.set_tags({"fer.stage": "train", "fer.model_uri": info.model_uri})
    with mlflow.start_run(experiment_id=experiment_id("fer2013")):
        mlflow.set_tags({"fer.stage": "evaluate", "fer.source_run": trained.info.run_id, "fer.settings": "tta=false",
                         "fer.split": "test", "fer.test_digest": TEST["digest"], "fer.demo_data": "false",
                         "fer.served_model_uri": f"runs:/{trained.info.run_id}/model"})
        mlflow.log_params({"data_uri": TEST["data_uri"]})
        mlflow.log_metric("test_accuracy", score)
    return promote.run().champion_version


@pytest.mark.slow
def test_pretrained_takes_the_champion_only_from_a_worse_model_on_the_same_data():
    better = _champion_scoring(TEST["metrics"]["test_accuracy"] + 0.01)
    kept = pretrained_stage.run()
    client = MlflowClient()
    assert kept.version != better and not kept.champion and "kept champion" in kept.message
    assert str(client.get_model_version_by_alias(DATA_MODEL, "champion").version) == better
    assert str(client.get_model_version_by_alias(DATA_MODEL, pretrained.ALIAS).version) == kept.version


@pytest.mark.slow
def test_pretrained_beats_a_worse_champion_and_leaves_it_previous():
    worse = _champion_scoring(TEST["metrics"]["test_accuracy"] - 0.01)
    taken = pretrained_stage.run()
    client = MlflowClient()
    assert taken.champion and str(client.get_model_version_by_alias(DATA_MODEL, "previous").version) == worse


@pytest.mark.slow
def test_predict_with_no_registry_uses_the_shipped_model_and_says_so(tmp_path, caplog):
    photo = tmp_path / "astronaut.png"
    Image.fromarray(photos.astronaut()).save(photo)
    with caplog.at_level("INFO"):
        outcome = predict.run(input=str(photo), detector="haar")
    said = [r.getMessage() for r in caplog.records if "shipped model" in r.getMessage()]
    assert len(said) == 1 and "pretrained" in said[0]
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.tags[pretrained.SHA_TAG] == RECORD["sha256"] and run.data.params["model_uri"] == "shipped"
    faces = outcome.predictions[outcome.predictions["face"] >= 0]
    assert len(faces) == 1
    expected = pretrained.served_model().predict(pd.DataFrame({"image": [photo.read_bytes()]}),
                                                 params={"detector": "haar"})
    assert faces["label"].tolist() == expected.loc[expected["face"] >= 0, "label"].tolist()


def test_predict_says_in_one_line_that_a_server_it_cannot_reach_failed_without_retrying_mlflows_retries(
        tmp_path, monkeypatch, caplog, capsys):
    """A tracking server that cannot be reached: MLflow's HTTP client retries each call itself
    (minutes by default); the project does not retry that again, and says how to go on."""
    from conftest import free_port

    photo = tmp_path / "astronaut.png"
    Image.fromarray(photos.astronaut()).save(photo)
    unreachable = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", unreachable)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    mlflow.set_tracking_uri(unreachable)
    with caplog.at_level("WARNING"), pytest.raises(SystemExit) as stopped:
        main(["predict", "--input", str(photo)])
    assert stopped.value.code == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert "Connection refused" in line and "MLFLOW_TRACKING_URI" in line and "runs:/" not in line
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_ZIP.exists(), reason="the shared FER2013 zip is not here")
def test_the_registered_shipped_model_scores_its_recorded_publictest_accuracy():
    pretrained_stage.run()
    scored = evaluate.run(model_uri=f"models:/{DATA_MODEL}@{pretrained.ALIAS}", data=str(SHARED_ZIP))
    assert scored.test_digest == TEST["digest"]
    assert scored.metrics["test_accuracy"] == pytest.approx(TEST["metrics"]["test_accuracy"], abs=1e-9)
    assert scored.metrics["test_f1_macro"] == pytest.approx(TEST["metrics"]["test_f1_macro"], abs=1e-9)


def test_a_logged_model_carries_the_code_but_not_the_shipped_files(tmp_path):
    pyfunc_model.save_model(tiny_keras_model(0), tmp_path / "model")
    code = tmp_path / "model" / "code" / "fer_mlflow"
    assert (code / "pretrained" / "__init__.py").exists() and (code / "serving" / "pyfunc_model.py").exists()
    assert not (code / "pretrained" / "files").exists() and not list(code.rglob("__pycache__"))
    assert sum(f.stat().st_size for f in (tmp_path / "model").rglob("*") if f.is_file()) < 2**20


@pytest.mark.parametrize("variant", pretrained.VARIANTS)
def test_the_model_card_is_what_the_record_renders(variant):
    from fer_mlflow.pretrained import card

    page = Path(__file__).resolve().parents[1] / "docs" / pretrained.card_page(variant)
    assert page.read_text() == card.render(variant), \
        f"run: python -m fer_mlflow.pretrained.card {variant} > docs/{pretrained.card_page(variant)}"


def test_the_command_line_offers_the_shipped_variants_and_refuses_others(capsys):
    from fer_mlflow import cli

    assert tuple(cli.VARIANTS.choices) == pretrained.VARIANTS
    assert "tiny" in refused(["pretrained", "--variant", "tiny"], capsys)
    with pytest.raises(ConfigError, match="unknown shipped model 'tiny'; expected one of"):
        pretrained.record("tiny")


def test_a_card_says_which_network_was_fine_tuned_from_another_and_not_trained_on_its_own(tmp_path, monkeypatch):
    from fer_mlflow.pretrained import card

    files = tmp_path / "files"
    shutil.copytree(pretrained.FILES, files)
    monkeypatch.setattr(pretrained, "FILES", files)
    path = files / "accurate" / pretrained.RECORD_NAME
    found = json.loads(path.read_text())
    assert "each member trained on its own on the same split" in card.render("accurate")
    found["training"]["members"][1]["params"]["init"] = "models:/fer-emotion@pretrained#0"
    path.write_text(json.dumps(found))
    pretrained._read_record.cache_clear()
    page = card.render("accurate")
    member = found["training"]["members"][1]
    assert (f"member 1, {member['title']}: {member['epochs']} epochs starting from the weights of "
            f"`models:/fer-emotion@pretrained#0` in {member['minutes']:.0f} minutes") in page
    assert "each member trained on the same split" in page and "on its own" not in page
    pretrained._read_record.cache_clear()


def test_a_fast_card_names_its_teacher_once_the_accurate_variant_is_replaced(tmp_path, monkeypatch):
    from fer_mlflow.pretrained import card

    teacher = pretrained.record("fast")["training"]["teacher"]
    shipped = pretrained.FILES

    def shipped_with(sha256: str) -> None:
        """The shipped files, copied, with the accurate variant's checksum `sha256`."""
        files = tmp_path / sha256[:8]
        shutil.copytree(shipped, files)
        accurate = files / "accurate" / pretrained.RECORD_NAME
        accurate.write_text(json.dumps({**json.loads(accurate.read_text()), "sha256": sha256}))
        monkeypatch.setattr(pretrained, "FILES", files)

    shipped_with(teacher["shipped_sha256"])  # the accurate variant is still the fast one's teacher
    assert "distilled from [the accurate variant](model-card.md)" in card.render("fast")
    assert "Narrower networks distilled from it serve faster: [the fast variant]" in card.render("accurate")
    shipped_with("0" * 64)  # replaced
    assert (f"distilled from the accurate variant shipped on {teacher['made']} ({teacher['title']}; SHA-256 "
            f"`{teacher['shipped_sha256'][:12]}...`), since replaced by [another](model-card.md)") in card.render("fast")
    assert "distilled from an earlier accurate variant serve faster: [the fast variant]" in card.render("accurate")


@pytest.mark.slow
def test_a_shipped_model_made_from_a_distilled_run_records_the_shipped_teacher(tiny_npz):
    from fer_mlflow.learning.teaching import teacher_source

    registered = pretrained_stage.run()
    uri = f"models:/fer-emotion@{pretrained.ALIAS}"
    tags = teacher_source(uri, registry_load(uri))
    assert tags == {"fer.teacher_run": registered.run_id, "fer.teacher_version": "fer-emotion/1"}
    student = _trained_run(tiny_npz, 0, 2)
    client = MlflowClient()
    for key, value in {**tags, "fer.teacher": uri}.items():
        client.set_tag(student, key, value)
    client.log_param(student, "teacher", uri)
    block = _made_module().training_block(client, client.get_run(student))["teacher"]
    assert block == {"uri": uri, "run_id": registered.run_id, "version": "fer-emotion/1", "title": RECORD["title"],
                     "shipped_sha256": RECORD["sha256"], "made": RECORD["made"]["date"]}


def _made_module():
    """tools/make_pretrained.py, imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_pretrained", Path(__file__).resolve().parents[1] / "tools"
                                                  / "make_pretrained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trained_run(data_uri: str, seed: int, epochs: int) -> str:
    """A finished run as `train` leaves one: the tiny model of `seed`, its tags, data_uri, per-epoch
    curves and final metrics."""
    from fer_mlflow.data import dataset as ds

    with mlflow.start_run(experiment_id=experiment_id("fer2013")) as run:
        info = pyfunc_model.log_model(tiny_keras_model(seed))
        mlflow.set_tags({"fer.stage": "train", "fer.model": "cnn", "fer.model_uri": info.model_uri,
                         "fer.data_digest": ds.load(data_uri).digest(), "fer.data": "tiny"})
        mlflow.log_params({"data_uri": data_uri, "model": "cnn", "seed": seed, "widths": "4,8",
                           "train_images": 48, "val_images": 16})
        for step in range(epochs):
            mlflow.log_metrics({"loss": 2 - step / 10, "accuracy": 0.2 + step / 20, "val_loss": 2.1 - step / 10,
                                "val_accuracy": 0.2 + step / 25, "learning_rate": 0.05 / (step + 1)}, step=step)
        mlflow.log_metrics({"best_val_accuracy": 0.2 + (epochs - 1) / 25, "train_seconds": 60.0 * epochs})
    return run.info.run_id


def test_a_network_stored_at_half_precision_is_half_the_file_and_loads_as_its_rounded_self(tmp_path):
    import h5py
    import keras
    import zipfile

    made = _made_module()
    network = pretrained.keras_model("fast")
    made.save(network, tmp_path / "full.keras")
    made.rounded_to_half(network)
    made.save(network, tmp_path / "half.keras", "float16")
    assert (tmp_path / "half.keras").stat().st_size < 0.6 * (tmp_path / "full.keras").stat().st_size
    with zipfile.ZipFile(tmp_path / "half.keras") as archive, \
            h5py.File(archive.open(made.WEIGHTS_FILE), "r") as weights:
        stored = []
        weights.visititems(lambda name, item: stored.append(item.dtype) if isinstance(item, h5py.Dataset) else None)
    assert stored and set(stored) == {np.dtype(np.float16)}
    loaded = keras.models.load_model(tmp_path / "half.keras", compile=False)
    assert {w.dtype for w in loaded.weights} == {"float32"}  # computed in float32, as before
    for found, rounded in zip(loaded.get_weights(), network.get_weights(), strict=True):
        np.testing.assert_array_equal(found, rounded)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded(pixels), network(pixels))


@pytest.mark.slow
@pytest.mark.parametrize("weights_dtype", ["float32", "float16"])
def test_an_ensemble_made_into_the_shipped_model_registers_with_each_members_curves_and_card(
        tiny_npz, tmp_path, monkeypatch, capsys, weights_dtype):
    from fer_mlflow.pretrained import card
    from fer_mlflow.stages import ensemble

    made = _made_module()
    runs = [_trained_run(tiny_npz, 0, 3), _trained_run(tiny_npz, 1, 5)]
    outcome = ensemble.run(runs=",".join(runs))
    shutil.copytree(pretrained.FILES / "fast", tmp_path / "files" / "fast")  # the accurate card names the fast one
    monkeypatch.setattr(pretrained, "FILES", tmp_path / "files")
    monkeypatch.setattr(made, "FILES", tmp_path / "files")
    monkeypatch.setattr("sys.argv", ["make_pretrained.py", "--run-id", outcome.run_id, "--data", tiny_npz,
                                     "--title", "two tiny networks", "--variant", "accurate", "--command", "ensemble",
                                     "--weights-dtype", weights_dtype])
    made.main()
    shipped = pretrained.record("accurate")
    training = shipped["training"]
    assert training["kind"] == "ensemble" and training["run_id"] == outcome.run_id
    assert [m["run_id"] for m in training["members"]] == runs
    assert [m["epochs"] for m in training["members"]] == [3, 5] and training["epochs"] == 8
    assert training["minutes"] == pytest.approx(8.0)
    assert all(len(m["history"]["val_accuracy"]) == m["epochs"] for m in training["members"])
    # the shipped file is the ensemble's one Keras model, and its record's checksum is that file's
    assert hashlib.sha256(pretrained.model_file().read_bytes()).hexdigest() == shipped["sha256"]
    pixels = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 1)).astype(np.float32)
    members = [pyfunc_model.keras_model_of(mlflow.pyfunc.load_model(f"runs:/{r}/model")) for r in runs]
    if weights_dtype == "float16":  # what is stored, scored and served: the members rounded to half precision
        for member in members:
            made.rounded_to_half(member)
    np.testing.assert_allclose(pretrained.keras_model()(pixels), np.mean([m(pixels) for m in members], axis=0),
                               atol=1e-6)
    assert shipped["weights_dtype"] == weights_dtype

    registered = pretrained_stage.run()
    client = MlflowClient()
    for key, epochs in curves(shipped).items():
        assert len(client.get_metric_history(registered.run_id, key)) == epochs
    figures = {a.path for a in client.list_artifacts(registered.run_id, "figures")}
    assert {"figures/training_curves_member_0.png", "figures/training_curves_member_1.png"} <= figures
    page = card.render("accurate")
    assert "an ensemble of 2 convolutional networks" in page and "8 epochs in 8 minutes in all" in page
    assert "averaged with equal weights" in page and "its own `train` and `ensemble` entry points" in page
    assert "member 0, cnn 4-8, 3 epochs:" in page and "member 1, cnn 4-8, 5 epochs:" in page
    assert "48 images to train and 16 held out for validation" in page  # the members' split
    assert all(f"run `{r}`" in page for r in runs)
    assert ("its weights stored as float16" in page) == (weights_dtype == "float16")


def _shipped_pair(tiny_npz: str, tmp_path, monkeypatch):
    """Two tiny trained networks averaged and shipped as the accurate variant (into a copy of the shipped
    files), then registered by `pretrained`: the `ship(outcome, title)` that made it, the two training
    runs, and the pair's `pretrained` run."""
    from fer_mlflow.stages import ensemble

    made = _made_module()
    shutil.copytree(pretrained.FILES / "fast", tmp_path / "files" / "fast")
    monkeypatch.setattr(pretrained, "FILES", tmp_path / "files")
    monkeypatch.setattr(made, "FILES", tmp_path / "files")

    def ship(outcome, title: str) -> None:
        monkeypatch.setattr("sys.argv", ["make_pretrained.py", "--run-id", outcome.run_id, "--data", tiny_npz,
                                         "--title", title, "--variant", "accurate"])
        made.main()
        pretrained._read_record.cache_clear()

    runs = [_trained_run(tiny_npz, 0, 3), _trained_run(tiny_npz, 1, 5)]
    ship(ensemble.run(runs=",".join(runs)), "two tiny networks")
    return ship, runs, pretrained_stage.run().run_id


@pytest.mark.slow
def test_a_shipped_ensemble_averaged_with_a_new_network_ships_as_all_its_networks(tiny_npz, tmp_path, monkeypatch):
    """An earlier shipped ensemble (its `pretrained` run) as a member of a new ensemble: the record,
    the registered run's curves and the card name each network, with its share of the answer."""
    from fer_mlflow.pretrained import card
    from fer_mlflow.stages import ensemble

    ship, runs, pair = _shipped_pair(tiny_npz, tmp_path, monkeypatch)
    third = _trained_run(tiny_npz, 2, 4)
    ship(ensemble.run(runs=f"{pair},{third}", weights="0.666667,0.333333"), "three tiny networks")

    shipped = pretrained.record("accurate")
    assert [n["run_id"] for n in pretrained.networks(shipped)] == [*runs, third]
    assert [n.get("within", "") for n in pretrained.networks(shipped)] == ["two tiny networks"] * 2 + [""]
    assert pretrained.network_weights(shipped) == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert shipped["training"]["epochs"] == 12
    registered = pretrained_stage.run()
    client = MlflowClient()
    assert {key: len(client.get_metric_history(registered.run_id, key)) for key in curves(shipped)} == {
        "member_0/val_accuracy": 3, "member_1/val_accuracy": 5, "member_2/val_accuracy": 4}
    page = card.render("accurate")
    assert "an ensemble of 3 convolutional networks (their probabilities averaged with equal weights" in page
    assert "member 1, cnn 4-8, 5 epochs (one of two tiny networks, shipped before):" in page
    assert "member 2, cnn 4-8, 4 epochs:" in page and "12 epochs in 12 minutes in all" in page


@pytest.mark.slow
def test_one_network_of_a_shipped_ensemble_averaged_with_a_new_one_ships_with_its_own_record(
        tiny_npz, tmp_path, monkeypatch):
    """``ensemble -P runs=<shipped pair's run>#1,<run>``: the record holds that network's own training block
    (its run, epochs, curves), says which shipped ensemble it came from, and the card names it so."""
    from fer_mlflow.pretrained import card
    from fer_mlflow.stages import ensemble

    ship, runs, pair = _shipped_pair(tiny_npz, tmp_path, monkeypatch)
    third = _trained_run(tiny_npz, 2, 4)
    ship(ensemble.run(runs=f"{pair}#1,{third}"), "the second tiny network and a third")

    shipped = pretrained.record("accurate")
    assert [n["run_id"] for n in pretrained.networks(shipped)] == [runs[1], third]
    assert [n["epochs"] for n in pretrained.networks(shipped)] == [5, 4] and shipped["training"]["epochs"] == 9
    assert [n.get("within", "") for n in pretrained.networks(shipped)] == ["two tiny networks", ""]
    assert pretrained.network_weights(shipped) == pytest.approx([0.5, 0.5], abs=1e-5)
    registered = pretrained_stage.run()
    assert {key: len(MlflowClient().get_metric_history(registered.run_id, key)) for key in curves(shipped)} == {
        "member_0/val_accuracy": 5, "member_1/val_accuracy": 4}
    page = card.render("accurate")
    assert "member 0, cnn 4-8, 5 epochs (one of two tiny networks, shipped before):" in page
    assert "member 1, cnn 4-8, 4 epochs:" in page
    pretrained._read_record.cache_clear()

