"""The train entry point: every model trains through `mlflow run`, metrics come one per epoch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import keras
import mlflow
import numpy as np
import pytest
from conftest import all_runs, mlflow_run, refused
from mlflow import MlflowClient

from fer_mlflow.data import dataset as ds
from fer_mlflow.learning import models
from fer_mlflow.stages import train
from fer_mlflow.cli import main
from fer_mlflow.serving.pyfunc_model import predict_pixels
from fer_mlflow.tracking.runs import log_params
from fer_mlflow.learning.loop import ImageCounter, TimeBudget, optimizer

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


def the_run(name_tag: str = "train"):
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`fer.stage` = '{name_tag}'")
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def trained_through_mlflow_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    """The one `mlflow run -e train` of this module, shared by its tests: a cnn for one epoch on the
    raw demo source, in an experiment the user chose (MLFLOW_EXPERIMENT_NAME); and its store."""
    folder = tmp_path_factory.mktemp("mlflow-run-train")
    store = f"sqlite:///{folder}/mlflow.db"
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": "mine"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # where the store's artifacts go (./mlruns)
        done = mlflow_run("train", {"model": "cnn", "data": "demo", "epochs": 1, "batch_size": 32}, store, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, store


def resolved(params: dict, name: str) -> str:
    """A parameter's value as used: `mlflow run` logs "auto" as typed and the value under <name>_resolved,
    in-process the value itself is logged."""
    return params.get(f"{name}_resolved", params[name])


def check_trained(run, model: str, image_size: int | None = None, dropout: float | None = None) -> None:
    """A finished training run of `model` with its defaults resolved and logged, inputs recorded, and
    a logged model that serves probabilities."""
    assert run.info.status == "FINISHED"
    assert run.data.tags["fer.model"] == model and run.data.tags["mlflow.runName"].startswith(model)
    params = run.data.params
    assert int(params["num_params"]) > 0 and params["weights_used"].startswith("none")
    assert "data_digest" in params and "best_val_accuracy" in run.data.metrics
    assert float(resolved(params, "dropout")) == (models.DEFAULT_DROPOUT[model] if dropout is None else dropout)
    assert resolved(params, "optimizer") == train.DEFAULT_OPTIMIZER[model]
    assert resolved(params, "image_size") == str(image_size or models.DEFAULT_IMAGE_SIZE[model])
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"train", "val"}
    loaded = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    predicted = predict_pixels(loaded, np.zeros((2, 48, 48), np.uint8))
    assert len(predicted) == 2 and np.allclose(predicted.filter(like="prob_").sum(axis=1), 1, atol=1e-4)


@pytest.mark.slow
def test_mlflow_run_train_logs_auto_as_typed_and_resolved(trained_through_mlflow_run):
    _, store = trained_through_mlflow_run
    mlflow.set_tracking_uri(store)
    run = the_run()
    check_trained(run, "cnn")
    # Left at "auto", these are logged as typed and, resolved, under <name>_resolved.
    assert run.data.params["dropout"] == "auto" and "dropout_resolved" in run.data.params
    assert "optimizer_resolved" in run.data.params and "image_size_resolved" in run.data.params


@pytest.mark.slow
def test_mlflow_run_train_in_a_chosen_experiment_cleans_a_raw_source_in_a_nested_run(trained_through_mlflow_run):
    _, store = trained_through_mlflow_run
    client = MlflowClient(store)
    mlflow.set_tracking_uri(store)
    runs = {r.data.tags["fer.stage"]: r for r in all_runs()}
    assert set(runs) == {"train", "clean"}  # nothing else, in no other experiment
    training, cleaning = runs["train"], runs["clean"]
    assert cleaning.data.tags["mlflow.parentRunId"] == training.info.run_id
    assert training.data.params["data_uri"] == f"runs:/{cleaning.info.run_id}/dataset/dataset.npz"
    assert training.info.run_name.startswith("cnn-demo sgd lr=0.05 1ep")
    assert client.get_experiment(training.info.experiment_id).name == "mine"
    assert client.get_experiment(cleaning.info.experiment_id).name == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("model, image_size", [("cnn_shallow", None), ("cnn_deep", 48)])
def test_each_other_model_trains_through_the_cli(model, image_size, tiny_npz):
    # The other networks through the command `mlflow run` calls, in this process: one `mlflow run`
    # (above) shows the entry point; the ResNet's, killed and resumed, is in test_checkpoints.py.
    arguments = ["--image-size", str(image_size)] if image_size else []
    if model == "cnn_deep":  # a rate given is logged and built; cnn_shallow's is left to its default
        arguments += ["--dropout", "0.4"]
    main(["train", "--model", model, "--data", tiny_npz, "--epochs", "1", "--batch-size", "32", *arguments])
    run = the_run()
    expected = 0.4 if model == "cnn_deep" else models.DEFAULT_DROPOUT[model]  # built with the rate resolved
    check_trained(run, model, image_size, dropout=expected)
    network = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").unwrap_python_model().keras_model
    rates = {layer.rate for layer in network.layers if isinstance(layer, keras.layers.Dropout)}
    assert rates == {expected}


@pytest.mark.slow
def test_metric_history_has_one_point_per_epoch(tiny_npz):
    outcome = train.run(train.TrainConfig(model="cnn", data=tiny_npz, epochs=3, batch_size=32))
    client = MlflowClient()
    for metric in EPOCH_METRICS:
        history = client.get_metric_history(outcome.run_id, metric)
        assert sorted(m.step for m in history) == [0, 1, 2], metric
    rates = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "learning_rate"),
                                     key=lambda m: m.step)]
    assert rates[0] > 0 and rates[-1] < max(rates)  # warm-up, then cosine decay
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"model_summary.txt", "figures"} <= artifacts
    # The logged model is the best epoch's: on the val split it scores best_val_accuracy.
    val = ds.load(tiny_npz).split("val")
    labels = predict_pixels(mlflow.pyfunc.load_model(outcome.model_uri), val.images)["label"].to_numpy()
    accuracy = np.mean(labels == np.asarray(val.class_names)[val.labels])
    assert accuracy == pytest.approx(client.get_run(outcome.run_id).data.metrics["best_val_accuracy"], abs=1e-6)


@pytest.mark.slow  # over 10 s: keeps -m 'not slow' under 3 minutes
def test_time_budget_ends_training_and_the_cosine_decay_with_it(tiny_npz):
    config = train.TrainConfig(model="cnn", data=tiny_npz, batch_size=32, time_budget=0.4, patience=1000)
    outcome = train.run(config)
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.data.params["epochs"] == str(train.MAX_EPOCHS)  # "auto" resolved: the time ends training
    assert 2 < outcome.epochs_trained < train.MAX_EPOCHS
    assert run.data.metrics["train_seconds"] < config.time_budget * 60 + 15  # the budget, one last step, model and logging
    rates = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "learning_rate"),
                                     key=lambda m: m.step)]
    assert len(rates) == outcome.epochs_trained
    assert max(rates) <= config.resolved().learning_rate and rates[-1] < 0.1 * max(rates)  # decayed by the budget's end


def test_time_budget_schedule_follows_whichever_runs_out_first():
    budget = TimeBudget(minutes=60, peak=1.0, total_steps=10, warmup_steps=2, cosine=True)
    budget.on_train_begin()
    rates = []
    for step in range(11):
        budget.step = step
        rates.append(budget.rate())
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.5 * 0.5 * (1 + np.cos(np.pi * 0.1)), rel=1e-3)
    assert rates[2:] == sorted(rates[2:], reverse=True) and rates[10] == pytest.approx(0.0, abs=1e-9)
    budget.step, budget.started = 2, time.perf_counter() - 30 * 60  # half the time gone, a fifth of the steps
    assert budget.progress() == pytest.approx(0.5, abs=1e-3)
    assert budget.rate() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("name, kind", [("adamw", keras.optimizers.AdamW), ("sgd", keras.optimizers.SGD)])
def test_optimizers_decay_weights_by_rate_times_weight_decay(name, kind):
    made = optimizer(name, "constant", 0.1, 0.01, steps=10, warmup_steps=0)
    assert isinstance(made, kind)
    if name == "sgd":
        assert made.nesterov and made.momentum == 0.9
    weights = keras.Variable(np.ones(3, np.float32))
    made.apply_gradients([(keras.ops.zeros(3), weights)])  # no gradient: only the decay moves them
    np.testing.assert_allclose(keras.ops.convert_to_numpy(weights), 1 - 0.1 * 0.01, rtol=1e-6)


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        self.steps -= 1
        self.model.stop_training = self.steps == 0


@pytest.mark.parametrize("stop_after, expected", [(None, 2 * 10), (4, 10 + 4)])
def test_image_counter_counts_a_short_last_batch_and_a_cut_epoch(stop_after, expected):
    # 10 images in batches of 4 (4, 4, 2) for two epochs; stopped after 4 steps, the second holds 4.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    counter = ImageCounter(images=10, batch_size=4)
    callbacks = [counter] + ([_StopAfter(stop_after)] if stop_after else [])
    model.fit(np.zeros((10, 3)), np.zeros((10, 2)), batch_size=4, epochs=2, verbose=0, callbacks=callbacks)
    assert counter.seen == expected


@pytest.mark.parametrize("given, expected", [
    ({"model": "cnn"}, ("sgd", 0.05, 5e-3)),
    ({"model": "resnet50"}, ("adamw", 1e-3, 1e-4)),
    ({"model": "cnn", "optimizer": "adamw"}, ("adamw", 1e-3, 1e-4)),
    ({"model": "cnn", "learning_rate": 0.01, "weight_decay": 0.0}, ("sgd", 0.01, 0.0)),
])
def test_optimizer_rate_and_decay_default_by_model_then_optimizer(given, expected):
    config = train.TrainConfig(**given).resolved()
    assert (config.optimizer, config.learning_rate, config.weight_decay) == expected


def test_auto_parameters_get_their_resolved_value_logged_beside_them(tracking):
    with mlflow.start_run() as run:
        mlflow.log_params({"epochs": "auto", "batch_size": "64"})
        log_params({"epochs": 30, "batch_size": 64, "seed": 0})
    params = MlflowClient().get_run(run.info.run_id).data.params
    assert params == {"epochs": "auto", "epochs_resolved": "30", "batch_size": "64", "seed": "0"}


@pytest.mark.parametrize("phase_two_peak, kept", [(0.55, "phase one"), (0.6, "phase one"), (0.7, "phase two")])
def test_the_model_kept_is_the_best_of_both_phases(phase_two_peak, kept):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    phase_one_best = [np.full_like(w, 1.0) for w in model.get_weights()]
    phase_two_best = [np.full_like(w, 2.0) for w in model.get_weights()]
    model.set_weights(phase_two_best)  # as phase 2's early stopping leaves it
    restored = train.keep_best_of_phases(model, phase_one_best, {"val_accuracy": [0.5, 0.6]},
                                         {"val_accuracy": [0.4, phase_two_peak]})
    assert restored == (kept == "phase one")
    expected = phase_one_best if kept == "phase one" else phase_two_best
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), expected))


def test_imagenet_offline_is_one_clear_line(tiny_npz, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "resnet50", "--weights", "imagenet", "--data", tiny_npz,
              "--image-size", "32", "--epochs", "1"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "weights=none" in errors[0]
    assert the_run().info.status == "FAILED"


@pytest.mark.parametrize("args, expected", [
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "many"], "--epochs"),
    (["--model", "vgg99"], "--model"),
    (["--image-size", "8"], "--image-size"),
    (["--learning-rate", "-1"], "--learning-rate"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--dropout", "1.5"], "--dropout"),
    (["--dropout", "lots"], "--dropout"),
    (["--time-budget", "-1"], "--time-budget"),
    (["--widths", "16,x"], "--widths"),
    (["--widths", "16,0"], "--widths"),
    (["--convs", "1,x"], "--convs"),
    (["--convs", "5"], "--convs"),
])
def test_bad_train_options_are_one_line(args, expected, capsys):
    assert expected in refused(["train", *args], capsys)


def test_convs_that_do_not_match_the_widths_are_one_line_and_no_run(tiny_npz, capsys):
    error = refused(["train", "--data", tiny_npz, "--widths", "8,16", "--convs", "1,2,3"], capsys)
    assert error.startswith("error") and "convs=1,2,3" in error and "widths=8,16" in error


@pytest.mark.slow  # over 10 s: keeps -m 'not slow' under 3 minutes
def test_mirrored_strategy_trains_on_two_logical_cpus(tiny_npz, tracking):
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from fer_mlflow.stages import train
        train.run(train.TrainConfig(model="cnn", data={tiny_npz!r}, epochs=1, batch_size=32,
                                    strategy="mirrored"))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "MLFLOW_TRACKING_URI": tracking})
    assert done.returncode == 0, done.stderr[-3000:]
    run = the_run()
    assert run.info.status == "FINISHED" and run.data.params["replicas"] == "2"
