"""Weight averaging (`train -P ema=0.999`): the optimizer's moving average of the weights is what is
validated each epoch, what early stopping keeps and what the run logs, while training goes on from
the trained weights; a checkpoint holds both."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pytest
from conftest import refused, tiny_keras_model
from mlflow import MlflowClient

from fer_mlflow.data import dataset as ds
from fer_mlflow.errors import ConfigError
from fer_mlflow.learning.loop import AveragedWeights, ResumableEarlyStopping, TrainingState, optimizer, restore_model
from fer_mlflow.serving.pyfunc_model import predict_pixels
from fer_mlflow.stages import train


def weights(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.trainable_variables]


class Spy(keras.callbacks.Callback):
    """Records the weights at a point of each epoch: `when` is the callback method's name."""

    def __init__(self, when: str):
        super().__init__()
        self.seen: list[list[np.ndarray]] = []
        self.averages: list[list[np.ndarray]] = []
        setattr(self, when, self._record)

    def _record(self, *args, **kwargs):
        self.seen.append(weights(self.model))
        self.averages.append([v.numpy().copy() for v in self.model.optimizer._model_variables_moving_average])


def compiled(ema: float) -> keras.Model:
    model = tiny_keras_model(0)
    model.compile(optimizer=optimizer("sgd", "constant", 0.05, 0.0, 10, 0, ema=ema),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def test_the_average_is_validated_and_kept_and_training_goes_on_from_the_trained_weights(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 48, 48, 1)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 7, 64), 7)
    model = compiled(ema=0.9)
    trained, validated, after = Spy("on_test_begin"), Spy("on_test_end"), Spy("on_epoch_end")
    stop = ResumableEarlyStopping(patience=10)
    history = model.fit(x, y, validation_data=(x[:32], y[:32]), epochs=3, batch_size=16, verbose=0,
                        callbacks=[trained, stop, AveragedWeights(), validated, after])
    for epoch in range(3):
        # validation sees the moving average, not the weights being trained...
        assert all(np.array_equal(w, a) for w, a in zip(validated.seen[epoch], validated.averages[epoch]))
        assert not all(np.array_equal(w, t) for w, t in zip(validated.seen[epoch], trained.seen[epoch]))
        # ...and the trained weights are back for the next epoch (and the checkpoint)
        assert all(np.array_equal(w, t) for w, t in zip(after.seen[epoch], trained.seen[epoch]))
    best = int(np.argmax(history.history["val_accuracy"]))
    assert all(np.array_equal(w, v) for w, v in zip(weights(model), validated.seen[best]))

    # A checkpoint holds the average among the optimizer's variables: a resumed fit goes on with it.
    TrainingState().save(tmp_path, model, stop.best_weights)
    again = compiled(ema=0.9)
    restore_model(again, tmp_path)
    assert all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(again.optimizer._model_variables_moving_average,
                               model.optimizer._model_variables_moving_average))


def test_the_average_is_validated_with_batch_norm_statistics_of_its_own():
    """Keras averages the trainable weights only; the average validated with the trained network's
    batch-norm statistics named one class for nearly every FER2013 face. Its own statistics are the
    mean of its batch statistics over the training batches given; the trained ones come back."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (64, 48, 48, 1)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 7, 64), 7)
    keras.utils.set_random_seed(1)
    inputs = keras.Input((48, 48, 1))
    conv, norm = keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(momentum=0.9)
    pooled = keras.layers.GlobalAveragePooling2D()(norm(conv(keras.layers.Rescaling(1 / 255)(inputs))))
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(pooled))
    model.compile(optimizer=optimizer("sgd", "constant", 0.5, 0.0, 10, 0, ema=0.9),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    means = {"trained": [], "validated": [], "own": [], "after": []}

    def record(key):
        return lambda *args: means[key].append(norm.moving_mean.numpy().copy())

    def own(*args):  # the mean of the first layer's outputs over the batches, with the average in place
        means["own"].append(keras.ops.convert_to_numpy(conv(x / 255)).mean(axis=(0, 1, 2)))

    model.fit(x, y, validation_data=(x, y), epochs=2, batch_size=16, verbose=0, callbacks=[
        keras.callbacks.LambdaCallback(on_test_begin=record("trained")),
        ResumableEarlyStopping(patience=10),
        AveragedWeights([(x[:32], y[:32]), (x[32:], y[32:])]),
        keras.callbacks.LambdaCallback(on_test_end=lambda *args: (record("validated")(), own())),
        keras.callbacks.LambdaCallback(on_epoch_end=record("after"))])
    for epoch in range(2):
        np.testing.assert_allclose(means["validated"][epoch], means["own"][epoch], rtol=1e-4, atol=1e-4)
        assert not np.allclose(means["validated"][epoch], means["trained"][epoch], atol=1e-3)
        np.testing.assert_array_equal(means["after"][epoch], means["trained"][epoch])


def test_ema_out_of_range_is_one_line_before_any_run(tiny_npz, capsys):
    with pytest.raises(ConfigError, match=r"ema=1.0 must lie in 0..1 \(1 excluded\)"):
        train.TrainConfig(data=tiny_npz, ema=1.0).resolved()
    assert "--ema" in refused(["train", "--data", tiny_npz, "--ema", "1"], capsys)


@pytest.mark.slow
def test_a_run_with_ema_logs_the_average_its_best_val_accuracy_describes(tiny_npz):
    outcome = train.run(train.TrainConfig(model="cnn", data=tiny_npz, epochs=2, batch_size=32, widths=(8, 16),
                                          ema=0.9))
    run = MlflowClient().get_run(outcome.run_id)
    assert run.data.params["ema"] == "0.9"
    val = ds.load(tiny_npz).split("val")
    labels = predict_pixels(mlflow.pyfunc.load_model(outcome.model_uri), val.images)["label"].to_numpy()
    accuracy = np.mean(labels == np.asarray(val.class_names)[val.labels])
    assert accuracy == pytest.approx(run.data.metrics["best_val_accuracy"], abs=1e-6)
