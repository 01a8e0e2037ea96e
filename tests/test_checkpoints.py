"""Training keeps its whole state as it goes, and a stopped run goes on in the same MLflow run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import keras
import mlflow
import numpy as np
import pytest
from conftest import PROJECT, all_runs
from mlflow import MlflowClient
from test_interrupts import start

from fer_mlflow.data import dataset as ds
from fer_mlflow.serving import pyfunc_model
from fer_mlflow.serving.pyfunc_model import predict_pixels
from fer_mlflow.learning.loop import soft_targets
from fer_mlflow.tracking.registry import load_model
from fer_mlflow.stages import train
from fer_mlflow.cli import main
from fer_mlflow.errors import ConfigError

EPOCHS = 8  # killed at 3: enough epochs left that the kill comes first


def checkpoint_epoch(run_id: str) -> int:
    """The epoch the run's logged checkpoint has reached (0: none logged yet)."""
    if not MlflowClient().list_artifacts(run_id, "checkpoint"):
        return 0
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/state.json")
    except Exception:  # being written this instant
        return 0
    return json.loads(open(path).read())["epoch"]


def config(tiny_npz: str, **changes) -> train.TrainConfig:
    return train.TrainConfig(data=tiny_npz, epochs=EPOCHS, patience=EPOCHS, checkpoint_minutes=0, **changes)


@pytest.mark.slow
def test_a_run_killed_outright_resumes_in_the_same_run_as_if_it_had_never_stopped(tiny_npz, tracking):
    process = start(["train", "--data", tiny_npz, "--epochs", str(EPOCHS), "--patience", str(EPOCHS),
                     "--checkpoint-minutes", "0"], tracking)
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it was killed"
        runs = all_runs("tags.`fer.stage` = 'train'")
        if runs and checkpoint_epoch(runs[0].info.run_id) >= 3:
            break
        time.sleep(0.5)
    run_id = runs[0].info.run_id
    with pytest.raises(ConfigError, match=f"run {run_id} is being trained by process {process.pid} of this machine; "
                                          "stop it first"):  # a second trainer of the same run is refused
        train.run(config(tiny_npz, resume=run_id))
    os.killpg(process.pid, signal.SIGKILL)  # no clean-up at all: the run stays RUNNING
    process.wait()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"

    resumed = train.run(config(tiny_npz, resume=run_id))
    assert resumed.run_id == run_id and resumed.epochs_trained == EPOCHS
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["fer.resumes"] == "1"
    assert run.data.tags["fer.resume_1"].startswith("from epoch ")
    assert len(all_runs("tags.`fer.stage` = 'train'")) == 1  # the UI shows one run
    history = MlflowClient().get_metric_history(run_id, "learning_rate")
    assert {m.step for m in history} == set(range(EPOCHS))
    # The same schedule as a run never stopped: the optimizer's step count was restored.
    got = {m.step: m.value for m in history}  # a step logged twice (killed after it) keeps the resumed value
    assert got == pytest.approx(unstopped_rates(config(tiny_npz), int(run.data.params["train_images"])), rel=1e-5)
    mlflow.pyfunc.load_model(resumed.model_uri)

    with pytest.raises(ConfigError, match=f"run {run_id} finished; there is nothing to resume"):
        train.run(config(tiny_npz, resume=run_id))


def unstopped_rates(settings: train.TrainConfig, train_images: int) -> dict[int, float]:
    """The learning rate a run never stopped logs at the end of each epoch: its schedule (as train
    builds it: a tenth of the steps, at most one epoch, to warm up) at that epoch's last step."""
    from fer_mlflow.learning.loop import optimizer

    settings = settings.resolved()
    per_epoch = math.ceil(train_images / settings.batch_size)
    steps = per_epoch * settings.epochs
    made = optimizer(settings.optimizer, settings.schedule, settings.learning_rate, settings.weight_decay,
                     steps, min(steps // 10, per_epoch))
    rates = {}
    for epoch in range(settings.epochs):
        made.iterations.assign((epoch + 1) * per_epoch)
        rates[epoch] = float(keras.ops.convert_to_numpy(made.learning_rate))
    return rates




def test_a_damaged_checkpoint_or_a_deleted_run_is_refused_in_one_line_and_left_as_it_was(tiny_npz, tmp_path):
    """The checkpoint's files are read before the run is touched: a truncated array file or a state
    this version does not know is named damaged; a deleted run is to be restored first."""
    with mlflow.start_run() as other:
        mlflow.set_tag("fer.stage", "train")
        mlflow.log_params({"epochs": EPOCHS})
        (tmp_path / "checkpoint" / "a").mkdir(parents=True)
        (tmp_path / "checkpoint" / "a" / "weights.npz").write_bytes(b"PK\x03\x04 cut short")
        (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"epoch": 2, "slot": "a"}))
        mlflow.log_artifacts(str(tmp_path / "checkpoint"), "checkpoint")
    run_id = other.info.run_id
    MlflowClient().set_terminated(run_id, "KILLED")
    with pytest.raises(ConfigError, match=f"run {run_id}'s checkpoint is damaged .*start it again as a new run"):
        train.run(config(tiny_npz, resume=run_id))
    np.savez(tmp_path / "checkpoint" / "a" / "weights.npz", np.zeros(3))
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"epoch": 2, "slot": "a", "lr": 1}))
    mlflow.log_artifacts(str(tmp_path / "checkpoint"), "checkpoint", run_id=run_id)
    with pytest.raises(ConfigError, match=f"run {run_id}'s checkpoint is damaged"):
        train.run(config(tiny_npz, resume=run_id))
    MlflowClient().delete_run(run_id)
    with pytest.raises(ConfigError, match=f"run {run_id} was deleted; restore it first .mlflow runs restore"):
        train.run(config(tiny_npz, resume=run_id))
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and "fer.resumes" not in run.data.tags

def test_resuming_with_other_parameters_or_without_a_checkpoint_is_one_line(tiny_npz, capsys):
    with mlflow.start_run() as other:
        mlflow.set_tag("fer.stage", "train")
        mlflow.log_params({"epochs": 5, "batch_size": 64})
    MlflowClient().set_terminated(other.info.run_id, "KILLED")
    for arguments, expected in (
        (["--epochs", "6"], f"run {other.info.run_id} was trained with epochs=5, not 6; resume it with"),
        (["--epochs", "5"], f"run {other.info.run_id} has no checkpoint to resume from"),
    ):
        with pytest.raises(SystemExit) as exit:
            main(["train", "--data", tiny_npz, "--resume", other.info.run_id, *arguments])
        assert exit.value.code == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert expected in line
    assert MlflowClient().get_run(other.info.run_id).info.status == "KILLED"  # left as it was


def test_a_resumed_time_budget_counts_the_time_and_steps_used_before():
    from fer_mlflow.learning.loop import TimeBudget, TrainingState

    budget = TimeBudget(minutes=60, peak=1.0, total_steps=1000, warmup_steps=0, cosine=True)
    budget.restore(TrainingState(budget_seconds=45 * 60, budget_steps=100))
    budget.on_train_begin()
    assert budget.step == 100 and budget.progress() == pytest.approx(0.75, abs=1e-3)
    assert budget.rate() == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.75)), abs=1e-3)  # where it was
    budget.started -= 15 * 60  # the rest of the hour passes
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    budget.set_model(model)
    budget.on_train_batch_end(0)
    assert model.stop_training


SMALL = dict(widths=(8, 16), batch_size=8, checkpoint_minutes=0)  # about ten steps an epoch, quick


def logged_state(run_id: str) -> dict:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/state.json")
    return json.loads(open(path).read())


class SignalMidEpoch(keras.callbacks.Callback):
    """Sends this process SIGINT after the second batch of epoch `epoch`, as Ctrl-C would."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch, self.current = epoch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 1:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def signals_handled():
    """The CLI's SIGINT / SIGTERM handling (`interrupts.install`) in this process, for one test."""
    from fer_mlflow.learning import interrupts

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    interrupts.install()
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


@pytest.mark.slow
def test_a_signal_in_the_middle_of_an_epoch_leaves_a_checkpoint_of_the_last_whole_epoch(tiny_npz, signals_handled):
    from fer_mlflow.learning import interrupts

    settings = dict(data=tiny_npz, epochs=3, patience=3, **SMALL)
    with pytest.raises(interrupts.Interrupted):
        train.run(train.TrainConfig(**settings), callbacks=(SignalMidEpoch(1),))
    (run,) = all_runs("tags.`fer.stage` = 'train'")
    assert run.info.status == "KILLED"
    state = logged_state(run.info.run_id)
    train_images = int(run.data.params["train_images"])
    assert state["epoch"] == 1 and len(state["history"]["loss"]) == 1  # epoch 1 was cut: not done
    assert state["images_seen"] == train_images

    assert run.data.tags["fer.interrupted"] == "SIGINT"
    resumed = train.run(train.TrainConfig(**settings, resume=run.info.run_id))
    assert resumed.epochs_trained == 3  # epoch 1 trained again, in full
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert "fer.interrupted" not in tags and tags["fer.resume_1"].endswith(", stopped by SIGINT")
    seen = MlflowClient().get_run(run.info.run_id).data.metrics
    assert seen["train_images_per_second"] * seen["train_seconds"] == pytest.approx(3 * train_images, rel=1e-6)
    # The param `temperature` is the model's logged at the stop (MLflow never changes a param); the
    # served one, fitted after the last epoch, is the metric and the resume's tag.
    served = pyfunc_model.temperature_of(load_model(resumed.model_uri))
    logged = MlflowClient().get_run(run.info.run_id).data
    assert logged.metrics["temperature"] == pytest.approx(served)
    assert float(logged.tags["fer.resume_1.temperature"]) == served and "temperature" in logged.params


@pytest.mark.slow
def test_a_checkpoint_whose_arrays_are_not_the_models_is_refused_before_training_in_one_line(
        tiny_npz, signals_handled, tmp_path):
    """Arrays that read but do not fit the model (a file changed, or copied from another run's
    checkpoint) are named before any epoch. Before, Keras' own error came only when such arrays went
    into the model: best weights of another shape were trained past unnoticed, or failed at the end
    of training if early stopping put them back."""
    from fer_mlflow.learning import interrupts
    from fer_mlflow.learning.loop import load_arrays, save_arrays

    settings = dict(data=tiny_npz, epochs=3, patience=3, **SMALL)
    with pytest.raises(interrupts.Interrupted):
        train.run(train.TrainConfig(**settings), callbacks=(SignalMidEpoch(1),))
    (run,) = all_runs("tags.`fer.stage` = 'train'")
    slot = logged_state(run.info.run_id)["slot"]
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=f"checkpoint/{slot}",
                                                 dst_path=str(tmp_path / "download"))
    best = load_arrays(tmp_path / "download" / slot / "best_weights.npz")
    best[0] = np.zeros((3, 3, 1, 4), dtype=np.float32)  # the first kernel of a narrower cnn
    save_arrays(tmp_path / "download" / slot / "best_weights.npz", best)
    mlflow.log_artifacts(folder, f"checkpoint/{slot}", run_id=run.info.run_id)
    epochs = len(MlflowClient().get_metric_history(run.info.run_id, "val_accuracy"))

    with pytest.raises(ConfigError, match=r"the checkpoint's best_weights.npz array 0 is \(3, 3, 1, 4\) where the "
                                          r"model's .* is \(3, 3, 1, 8\): it is not this run's; start it again"):
        train.run(train.TrainConfig(**settings, resume=run.info.run_id))
    assert len(MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")) == epochs  # no epoch trained
    assert MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_a_distilled_run_resumes_learning_from_the_teacher_it_began_with(tiny_npz, signals_handled, monkeypatch):
    """A stopped student goes on with the probabilities its teacher gave when the run began, logged
    with the run: not with what the teacher's alias names by then, and without labelling again."""
    from fer_mlflow.learning import interrupts

    first = train.run(train.TrainConfig(data=tiny_npz, epochs=1, **SMALL))
    other = train.run(train.TrainConfig(data=first.data_uri, epochs=1, seed=1, **SMALL))
    client = MlflowClient()
    for outcome in (first, other):
        mlflow.register_model(outcome.model_uri, "teacher")
    client.set_registered_model_alias("teacher", "best", "1")
    taught = []
    original = train._fit

    def recording_fit(config, train_split, val, replicas, plan, extra=(), teaching=None, initial=None):
        taught.append(teaching)
        return original(config, train_split, val, replicas, plan, extra, teaching, initial)

    monkeypatch.setattr(train, "_fit", recording_fit)
    settings = dict(data=first.data_uri, epochs=3, patience=3, teacher="models:/teacher@best", **SMALL)
    with pytest.raises(interrupts.Interrupted):
        train.run(train.TrainConfig(**settings), callbacks=(SignalMidEpoch(1),))
    (run,) = all_runs("tags.`fer.teacher` = 'models:/teacher@best'")
    assert run.info.status == "KILLED"

    client.set_registered_model_alias("teacher", "best", "2")  # the alias moves on meanwhile
    resumed = train.run(train.TrainConfig(**settings, resume=run.info.run_id))
    assert resumed.epochs_trained == 3
    assert np.array_equal(taught[1], taught[0])
    split = ds.load(first.data_uri).split("train")
    served = {version: pyfunc_model.predict_crops(load_model(f"models:/teacher/{version}"), split.images)
              for version in (1, 2)}
    targets = {version: soft_targets(split.labels, frame.filter(like="prob_").to_numpy(), 0.5, 2.0)
               for version, frame in served.items()}
    assert np.allclose(taught[0], targets[1], atol=1e-5)
    relabelled = targets[2]
    assert not np.allclose(relabelled, taught[0])  # what a new labelling would have taught instead
    assert "teacher" in {a.path for a in client.list_artifacts(run.info.run_id)}
    tags = client.get_run(run.info.run_id).data.tags  # which model taught it, whatever the alias names now
    assert (tags["fer.teacher_version"], tags["fer.teacher_run"]) == ("teacher/1", first.run_id)


@pytest.mark.slow
def test_a_finished_run_keeps_no_checkpoint_slots(tiny_npz):
    outcome = train.run(train.TrainConfig(data=tiny_npz, epochs=2, **SMALL))  # logged after each epoch
    artifacts = {a.path for a in MlflowClient().list_artifacts(outcome.run_id)}
    assert "figures" in artifacts and "checkpoint" not in artifacts


class Killed(Exception):
    """The process died: nothing it would log after this reaches the store."""


@pytest.mark.resnet
@pytest.mark.slow
def test_a_resnet_killed_twice_while_fine_tuning_resumes_in_the_phase_it_was_in_on_another_machine(
        tiny_npz, tmp_path, monkeypatch):
    """Killed first while its first fine-tuning checkpoint was half uploaded (so it resumes in phase
    1), then after a whole epoch of phase 2 on a second machine (so it resumes there): one run."""
    from fer_mlflow.learning import models

    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3),
                                           pooling="avg")
    caches = [tmp_path / machine / "resnet50_notop.weights.h5" for machine in ("first", "second")]
    for cache in caches:  # where each machine's Keras keeps the ImageNet weights: weights_used differs
        cache.parent.mkdir()
        backbone.save_weights(cache)
    monkeypatch.setattr(models, "_fetch_imagenet", lambda *args: str(caches[0]))
    settings = train.TrainConfig(model="resnet50", data=tiny_npz, image_size=32, weights="imagenet", epochs=1,
                                 fine_tune_epochs=3, batch_size=32, patience=20, checkpoint_minutes=0)
    real, uploaded = mlflow.log_artifact, []

    def dies_in_phase_two(local_path, artifact_path=None, *args, **kwargs):
        # phase_one_best.npz is saved as phase 2 starts: its first flush uploads two arrays, then dies.
        if (os.path.dirname(local_path) and os.path.exists(os.path.join(os.path.dirname(local_path),
                                                                         "phase_one_best.npz"))):
            if len(uploaded) < 2:
                uploaded.append(artifact_path)
                return real(local_path, artifact_path, *args, **kwargs)
            raise Killed()
        return real(local_path, artifact_path, *args, **kwargs)

    monkeypatch.setattr(mlflow, "log_artifact", dies_in_phase_two)
    with pytest.raises(Killed):
        train.run(settings)
    (run,) = all_runs("tags.`fer.stage` = 'train'")
    state = logged_state(run.info.run_id)
    assert state["phase"] == 1 and uploaded == [f"checkpoint/{'b' if state['slot'] == 'a' else 'a'}"] * 2

    log_dict = mlflow.log_dict

    def dies_after_an_epoch_of_phase_two(dictionary, artifact_file, *args, **kwargs):
        log_dict(dictionary, artifact_file, *args, **kwargs)  # the whole checkpoint is logged, then
        if artifact_file == "checkpoint/state.json" and dictionary["phase"] == 2 and dictionary["epoch"] >= 1:
            raise Killed()

    monkeypatch.setattr(mlflow, "log_artifact", real)
    monkeypatch.setattr(mlflow, "log_dict", dies_after_an_epoch_of_phase_two)
    monkeypatch.setattr(models, "_fetch_imagenet", lambda *args: str(caches[1]))
    with pytest.raises(Killed):
        train.run(replace(settings, resume=run.info.run_id))
    state = logged_state(run.info.run_id)
    assert state["phase"] == 2 and state["epoch"] >= 1

    monkeypatch.setattr(mlflow, "log_dict", log_dict)
    resumed = train.run(replace(settings, resume=run.info.run_id))
    assert resumed.run_id == run.info.run_id and resumed.epochs_trained == 4
    run = MlflowClient().get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert "of phase 1" in run.data.tags["fer.resume_1"] and "of phase 2" in run.data.tags["fer.resume_2"]
    assert run.data.params["weights_used"] == f"imagenet ({caches[0]})"  # what the run started with
    assert run.data.tags["fer.resume_1.weights_used"] == f"imagenet ({caches[1]})"  # and where it went on
    assert int(run.data.params["num_params"]) > 0
    # The ResNet's own defaults (in-process, left unset, they are logged resolved).
    assert float(run.data.params["dropout"]) == models.DEFAULT_DROPOUT["resnet50"]
    assert run.data.params["optimizer"] == train.DEFAULT_OPTIMIZER["resnet50"]
    history = {m.step: m.value for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")}
    assert sorted(history) == [0, 1, 2, 3]  # one head epoch, then three fine-tuning epochs, counted on
    assert max(history.values()) == run.data.metrics["best_val_accuracy"]
    # The model logged is the one best_val_accuracy describes, whichever phase and run it came from.
    dataset = ds.load(tiny_npz).split("val")
    logged = mlflow.pyfunc.load_model(resumed.model_uri)
    assert pyfunc_model.runtime_of(logged) == "onnxruntime"  # a ResNet exports to ONNX like the cnns
    labels = predict_pixels(logged, dataset.images)["label"].to_numpy()
    accuracy = np.mean(labels == np.asarray(dataset.class_names)[dataset.labels])
    assert accuracy == pytest.approx(run.data.metrics["best_val_accuracy"], abs=1e-6)


def test_a_run_resumed_on_a_machine_with_other_replicas_records_them_in_a_tag_not_a_refused_param():
    with mlflow.start_run() as run:
        mlflow.log_params({"replicas": 2, "num_params": 10})
        mlflow.set_tag("fer.resumes", "1")  # as `_record_resume` leaves it on the resuming machine
        train.log_machine_params({"replicas": 4, "num_params": 10})
    logged = MlflowClient().get_run(run.info.run_id).data
    assert logged.params["replicas"] == "2" and logged.tags["fer.resume_1.replicas"] == "4"


@pytest.mark.slow
def test_a_run_started_by_mlflow_run_with_a_quoted_value_resumes(tiny_npz, tracking, tmp_path):
    # A path with a space: `mlflow run` logs it quoted for the shell ('...'), as it logs '' for empty.
    data = tmp_path / "my data" / "tiny.npz"
    data.parent.mkdir()
    data.write_bytes(open(tiny_npz, "rb").read())
    settings = {"data": str(data), "epochs": 20, "patience": 20, "widths": "8,16", "batch_size": 8,
                "checkpoint_minutes": 0}
    command = [sys.executable, "-m", "mlflow", "run", str(PROJECT), "-e", "train", "--env-manager", "local"]
    for key, value in settings.items():
        command += ["-P", f"{key}={value}"]
    MlflowClient().search_experiments()  # create the store's tables first: two creators would race
    process = subprocess.Popen(command, env={**os.environ, "MLFLOW_TRACKING_URI": tracking},
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it was killed"
        runs = all_runs("tags.`fer.stage` = 'train'")
        if runs and checkpoint_epoch(runs[0].info.run_id) >= 2:
            break
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_id = runs[0].info.run_id
    assert MlflowClient().get_run(run_id).data.params["data"] == f"'{data}'"  # as mlflow run stored it

    resumed = train.run(train.TrainConfig(**{**settings, "widths": (8, 16)}, resume=run_id))
    assert resumed.run_id == run_id and resumed.epochs_trained == 20
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
