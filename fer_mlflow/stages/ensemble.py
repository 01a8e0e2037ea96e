"""The `ensemble` stage: one served model that averages the probabilities of trained models.

Members are training runs, named by id (`runs`) or the `top` N finished training runs of the
experiment by a metric (``val_accuracy``: each run's best), all on one data digest and all trained
on the demo data or none (as the newest such run). Members must
share that digest (the same cleaned dataset, so the same train and validation split: train them on
one clean run's dataset, ``-P data=runs:/<clean run>/dataset/dataset.npz``, with different seeds or
models) and their class names; else the stage refuses in one line before anything is logged.
A named member may also be the run the ``pretrained`` stage logged for a shipped model: it was
trained on the FER2013 zip cleaned with the defaults (its digest says so), so it joins training runs
made on that same clean; the validation split is read from the first training run among the members,
or from `data` (a clean run's dataset, ``runs:/<clean run>/dataset/dataset.npz``, of the members'
digest), which every member's being a shipped model's run requires: so the shipped pair's two networks
become an 8-bit ensemble (``-P runs=<its run>#0,<its run>#1 -P data=... -P precision=int8``). ``<run id>#k`` names
the k-th network (from 0) of a run whose model is an ensemble (the shipped pair's run: ``<run>#1`` is
its second network), so one network of an ensemble can be averaged with others without the rest.

The ensemble is a single Keras model: the members side by side on the same pixels, each member's
probabilities scaled by its weight and summed. So it is logged by `pyfunc_model.log_model` as a
trained model is, and it loads, predicts (crops, photos, params such as ``tta``, each view through
every member), serves, evaluates (``evaluate -P run_id=<ensemble run>``) and is promoted exactly as
one is. Weights are ``equal``, ``fitted`` (the weights on the simplex that minimise the log-loss of
the validation split; its accuracy is then slightly optimistic, having been fitted there), or given
numbers, normalised to sum to 1. The members' raw probabilities (before their own temperatures) are
averaged, and the ensemble fits one temperature of its own on the validation split
(`calibration`; metrics ``temperature``, ``val_ece``, ``val_ece_untempered``), which it answers with.
With ``precision=int8`` the model serves an 8-bit integer network (`runtime.quantize_onnx`, calibrated
on training faces): on CPUs with 8-bit dot-product instructions about three times the crops a second
of a large ensemble; its figures (accuracy, log-loss, temperature) are then the 8-bit network's own,
and ``precision_resolved`` says float32 where quantizing failed or disagreed (a warning says why).

Logged to the run (tagged ``fer.stage=ensemble``, ``fer.model=ensemble``, ``fer.members``, and the
members' data digest as ``fer.data_digest``): params ``members``, ``weights`` (as given),
``weights_resolved``, ``precision`` and ``precision_resolved``, and per member ``member_<i>_run``,
``_model`` (its architecture), ``_model_uri`` (the logged model), ``_data_digest``, ``_weight``;
metrics ``val_accuracy`` and ``best_val_accuracy`` (the same figure, so ensembles rank beside
training runs), ``val_log_loss``, and each member's ``member_<i>_val_accuracy`` and
``_val_log_loss``, all on the validation split, one view; the model under ``model``; the
validation split as an input; a description linking the members' runs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from fer_mlflow.serving import calibration, runtime
from fer_mlflow.data.dataset import model_input
from fer_mlflow.errors import ConfigError, DataError
from fer_mlflow.tracking.runs import (
    DATA_EXPERIMENT, DEMO_TAG, data_context, log_params, log_split_inputs, run_params, stage_run,
)
from fer_mlflow.tracking.names import (
    DATA_DIGEST_TAG,
    DATA_TAG,
    DATA_URI_TAG,
    MODEL_FAMILY_TAG,
    MODEL_TAG,
    MODEL_URI_TAG,
    STAGE_TAG,
)

METRICS = {"val_accuracy": "best_val_accuracy"}  # a training run's figure for each ranking name
MEMBER_STAGES = ("train", "pretrained")  # the stages whose runs may be named as members
WEIGHTINGS = ("equal", "fitted")
PRECISIONS = ("float32", "int8")  # the arithmetic the logged model serves in (`runtime.quantize_onnx`)
MODEL_NAME = "ensemble"


@dataclass
class EnsembleOutcome:
    """The ensemble's run, its model and its figures on the validation split."""

    run_id: str
    model_uri: str
    members: list[str]
    weights: list[float]
    val_accuracy: float


@dataclass
class Member:
    """A training run taking part, and its model once loaded."""

    run: Run
    network: int | None = None  # with ``<run id>#k``: the k-th network of the run's ensemble model
    keras_model: object = None
    class_names: tuple[str, ...] = ()

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        """How `runs` names it: the run id, and ``#k`` for one network of its ensemble."""
        return self.run_id if self.network is None else f"{self.run_id}#{self.network}"

    @property
    def digest(self) -> str:
        return self.run.data.tags.get(DATA_DIGEST_TAG, "")


def run(runs: str = "", top: int = 0, metric: str = "val_accuracy", data_digest: str = "",
        weights: str = "equal", precision: str = "float32", data: str = "") -> EnsembleOutcome:
    """Build, check and log the ensemble of `runs` (comma-separated training run ids, each with
    ``#k`` for one network of that run's ensemble) or of the `top` training runs by `metric`, weighed
    and scored on the validation split of `data` or else of the first training member's dataset (see
    the module docstring)."""
    ids = [part.strip() for part in runs.split(",") if part.strip()]
    if bool(ids) == bool(top):
        raise ConfigError("name the members with -P runs=<id,id,...> or -P top=N (N >= 2), not both")
    if top == 1:
        raise ConfigError("top=1 is one model, not an ensemble; use -P top=2 or more")
    weighting = _weighting(weights, len(ids) if ids else top)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision} is not one of {', '.join(PRECISIONS)}")
    client = MlflowClient()
    experiment, tags = DATA_EXPERIMENT, {}
    dataset = _read(data) if data else None  # read once, before any run
    if dataset is not None and top and data_digest and data_digest != dataset.digest():
        raise ConfigError(f"data {data} is data {dataset.digest()}, not data_digest={data_digest}; give one of "
                          "the two, or both of the same data")
    if ids:  # named members (and `data`) are checked before any run starts
        from fer_mlflow.serving.pyfunc_model import network_number

        # "run#00" is "run#0": duplicates are found among the names as numbers read them
        named = [network_number(name) for name in ids]
        _unique([run_id if network is None else f"{run_id}#{network}" for run_id, network in named])
        members = _loaded([Member(_training_run(client, run_id), network) for run_id, network in named])
        experiment = client.get_experiment(members[0].run.info.experiment_id).name
        tags, _ = data_context(data or _data_uri(_reader(members)))
        if dataset is not None:
            _verified(dataset, data, members[0].digest, given=True)
    with stage_run("ensemble", "ensemble", {**tags, MODEL_TAG: MODEL_NAME, MODEL_FAMILY_TAG: MODEL_NAME},
                   experiment=experiment) as active, tempfile.TemporaryDirectory(prefix="fer-ensemble-") as scratch:
        log_params({"runs": runs, "top": top, "metric": metric, "data_digest": data_digest, "weights": weights,
                    "precision": precision, "data": data})
        if not ids:
            members = _loaded(_top(client, active.info.experiment_id, top, metric,
                                   data_digest or (dataset.digest() if dataset is not None else "")))
        data_uri = data or _data_uri(_reader(members))
        tags, _ = data_context(data_uri)
        names = [member.name for member in members]
        mlflow.set_tags({**tags, DATA_DIGEST_TAG: members[0].digest, DATA_URI_TAG: data_uri,
                         "fer.members": ",".join(names),
                         "mlflow.runName": f"ensemble {'+'.join(map(_model, members))}-{tags['fer.data']}"})
        if dataset is None:
            dataset = _verified(_read(data_uri), data_uri, members[0].digest)
        elif not ids:
            _verified(dataset, data, members[0].digest, given=True)
        val = dataset.split("val")
        log_split_inputs(val, data_uri, tags[DATA_TAG], splits=("val",))
        probabilities = _member_probabilities(members, val.images)
        chosen = fit_weights(probabilities, val.labels) if isinstance(weighting, str) else weighting
        combined = np.tensordot(chosen, np.stack(probabilities), axes=1)
        model = combine([m.keras_model for m in members], chosen)
        exported, int8 = (_int8_network(model, dataset.split("train"), Path(scratch)) if precision == "int8"
                          else (None, None))
        if int8:  # the figures below are those of the network served
            combined = runtime.onnx_network(int8).predict(model_input(val.images))
        metrics = {"val_accuracy": accuracy(combined, val.labels), "val_log_loss": log_loss(combined, val.labels)}
        metrics["best_val_accuracy"] = metrics["val_accuracy"]
        # Its own temperature, as train fits one: the members' raw probabilities are averaged, and
        # the mean's log-probabilities are divided by it when the ensemble answers.
        temperature = calibration.fit_temperature(combined, val.labels)
        metrics.update(temperature=temperature,
                       val_ece_untempered=calibration.expected_calibration_error(combined, val.labels),
                       val_ece=calibration.expected_calibration_error(
                           calibration.tempered(combined, temperature), val.labels))
        params = {"data_uri": data_uri, "members": ",".join(names),
                  "weights_resolved": ",".join(f"{w:.6f}" for w in chosen),
                  "precision_resolved": "int8" if int8 else "float32"}
        for index, (member, found) in enumerate(zip(members, probabilities)):
            metrics[f"member_{index}_val_accuracy"] = accuracy(found, val.labels)
            metrics[f"member_{index}_val_log_loss"] = log_loss(found, val.labels)
            model_uri = member.run.data.tags.get(MODEL_URI_TAG, f"runs:/{member.run_id}/model")
            params.update({f"member_{index}_run": member.run_id, f"member_{index}_model": _model(member),
                           f"member_{index}_model_uri": model_uri + ("" if member.network is None
                                                                    else f"#{member.network}"),
                           f"member_{index}_data_digest": member.digest,
                           f"member_{index}_weight": f"{chosen[index]:.6f}"})
        log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.set_tag("mlflow.note.content", _description(members, chosen, metrics, bool(int8)))
        from fer_mlflow.serving import pyfunc_model

        info = pyfunc_model.log_model(model, name="model", class_names=members[0].class_names,
                                      example_image=val.images[0], temperature=temperature, int8_onnx=int8,
                                      onnx=exported)
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        return EnsembleOutcome(active.info.run_id, f"runs:/{active.info.run_id}/model", names,
                               [float(w) for w in chosen], metrics["val_accuracy"])


def combine(keras_models: list, weights) -> object:
    """One Keras model: pixels (N, 48, 48, 1) in, the `weights`-weighted sum of `keras_models`'
    probabilities out. The members are renamed ``member_<i>_<name>`` (nested models must differ in
    name); their weights are untouched."""
    import keras

    inputs = keras.Input(keras_models[0].input_shape[1:], name="pixels")
    scaled = []
    for index, (model, weight) in enumerate(zip(keras_models, weights)):
        model.name = f"member_{index}_{model.name}"
        scaled.append(keras.layers.Rescaling(float(weight), name=f"weight_{index}")(model(inputs)))
    return keras.Model(inputs, keras.layers.Add(name="probabilities")(scaled), name=MODEL_NAME)


def fit_weights(probabilities: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Weights on the simplex (non-negative, summing to 1) minimising the log-loss of the weighted
    mean of the members' `probabilities` (each N x classes) for `labels`: a softmax over free
    parameters, minimised by L-BFGS from equal weights."""
    from scipy.optimize import minimize
    from scipy.special import softmax

    picked = np.stack([p[np.arange(len(labels)), labels] for p in probabilities])  # members x N

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights = softmax(theta)
        mixed = np.clip(weights @ picked, 1e-12, None)
        gradient_w = -(picked / mixed).mean(axis=1)
        return float(-np.log(mixed).mean()), weights * (gradient_w - weights @ gradient_w)

    found = minimize(loss, np.zeros(len(probabilities)), jac=True, method="L-BFGS-B")
    return softmax(found.x)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, probabilities.argmax(axis=1)))


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's log-loss over all the classes the probabilities have columns for, present or not.
    The rows are made to sum to one in float64 first: the members answer in float32, whose rows miss
    one by about 1e-7, more than scikit-learn allows a float64 row before it warns that they are not
    probabilities."""
    from sklearn.metrics import log_loss as sklearn_log_loss

    rows = np.asarray(probabilities, dtype=np.float64)
    rows = rows / rows.sum(axis=1, keepdims=True)
    return float(sklearn_log_loss(labels, rows, labels=np.arange(rows.shape[1])))


def _weighting(weights: str, count: int) -> str | np.ndarray:
    """"equal" as numbers, "fitted", or the given numbers normalised; ConfigError otherwise."""
    text = weights.strip().lower()
    if text == "fitted":
        return text
    if text == "equal":
        return np.full(count, 1.0 / count)
    try:
        given = np.array([float(part) for part in text.split(",")])
    except ValueError:
        given = np.array([])
    with np.errstate(over="ignore"):
        total = given.sum()
    if len(given) != count or not np.isfinite(given).all() or (given < 0).any() or not 0 < total < np.inf:
        raise ConfigError(f"weights={weights} is not {', '.join(WEIGHTINGS)} or {count} non-negative numbers "
                          "separated by commas (one per member, not all 0)")
    return given / total


def _unique(ids: list[str]) -> list[str]:
    twice = sorted({run_id for run_id in ids if ids.count(run_id) > 1})
    if twice:
        raise ConfigError(f"run {twice[0]} is named twice in runs; name each member once")
    if len(ids) < 2:
        raise ConfigError(f"an ensemble needs 2 or more members, got {len(ids)}; name more runs")
    return ids


def _training_run(client: MlflowClient, run_id: str) -> Run:
    """The finished training run `run_id` whose model was logged; ConfigError otherwise."""
    try:
        found = client.get_run(run_id)
    except MlflowException as error:
        raise ConfigError(f"run {run_id} not found in {mlflow.get_tracking_uri()}; "
                          "name training runs of this tracking store") from error
    stage = found.data.tags.get(STAGE_TAG, "?")
    if stage not in MEMBER_STAGES or found.info.status != "FINISHED" or MODEL_URI_TAG not in found.data.tags:
        raise ConfigError(f"run {run_id} is not a finished training run with a model (stage {stage}, "
                          f"status {found.info.status}); name finished training runs (or a pretrained run)")
    return found


def _reader(members: list[Member]) -> Member:
    """The member whose dataset gives the validation split: the first training run. A shipped model's
    run records the data of the store it was trained in, which this one need not have."""
    trained = [m for m in members if m.run.data.tags.get(STAGE_TAG) == "train"]
    if not trained:
        raise ConfigError("every member is a shipped model's run; give the data to weigh and score them on, "
                          "-P data=runs:/<clean run>/dataset/dataset.npz (the FER2013 zip cleaned with the "
                          "defaults), or name a training run of this store on that data beside them")
    return trained[0]


def _top(client: MlflowClient, experiment_id: str, top: int, metric: str, data_digest: str) -> list[Member]:
    """The `top` finished training runs of the experiment by `metric`, on `data_digest` (default:
    that of the newest such run)."""
    key = METRICS.get(metric, metric)
    found = client.search_runs([experiment_id], "tags.`fer.stage` = 'train' and attributes.status = 'FINISHED'",
                               order_by=["attributes.start_time DESC"], max_results=5000)
    found = [r for r in found if key in r.data.metrics and MODEL_URI_TAG in r.data.tags
             and DATA_DIGEST_TAG in r.data.tags]
    where = client.get_experiment(experiment_id).name
    if not found:
        raise ConfigError(f"experiment {where} has no finished training run with metric {key}; train models "
                          "first, choose the experiment with --experiment-name, or check -P metric=...")
    digest = data_digest or found[0].data.tags[DATA_DIGEST_TAG]
    on_digest = [r for r in found if r.data.tags[DATA_DIGEST_TAG] == digest]  # newest first
    # Demo-trained runs and others never mix, even on one digest (the demo's dataset read back from
    # a local copy is not tagged demo): the newest run's kind decides.
    demo = bool(on_digest) and _demo(on_digest[0])
    pool = sorted((r for r in on_digest if _demo(r) == demo), key=lambda r: r.data.metrics[key], reverse=True)
    if len(pool) < top:
        raise ConfigError(f"experiment {where} has {len(pool)} finished training run(s) on data {digest}, "
                          f"fewer than top={top}; train more on that data or ask for fewer")
    return [Member(r) for r in pool[:top]]


def _demo(run: Run) -> bool:
    return run.data.tags.get(DEMO_TAG) == "true"


def _check_data(members: list[Member]) -> None:
    """Refuse members trained on different data, in one line."""
    digests = {m.digest for m in members}
    if len(digests) > 1:
        first, other = members[0], next(m for m in members if m.digest != members[0].digest)
        raise ConfigError(f"members were trained on different data: run {first.run_id} on {first.digest}, "
                          f"run {other.run_id} on {other.digest}; train every member on one clean run's "
                          "dataset (-P data=runs:/<clean run>/dataset/dataset.npz)")


def _loaded(members: list[Member]) -> list[Member]:
    """`members` with their models loaded, once their data and class names are checked to agree."""
    from fer_mlflow.serving import pyfunc_model
    from fer_mlflow.tracking.registry import load_model

    _check_data(members)
    for member in members:
        loaded = load_model(f"runs:/{member.run_id}/model")
        member.keras_model = pyfunc_model.keras_model_of(loaded)
        if member.network is not None:
            member.keras_model = pyfunc_model.member_network(member.keras_model, member.network,
                                                             f"run {member.run_id}'s model")
        member.class_names = pyfunc_model.class_names_of(loaded)
    first = members[0]
    for member in members[1:]:
        if member.class_names != first.class_names:
            raise ConfigError(f"members predict different classes: run {first.run_id} "
                              f"({', '.join(first.class_names)}), run {member.run_id} "
                              f"({', '.join(member.class_names)}); ensemble models of the same classes")
    return members


def _data_uri(member: Member) -> str:
    data_uri = run_params(member.run).get("data_uri", "")
    if not data_uri:
        raise ConfigError(f"run {member.run_id} records no data_uri; ensemble training runs of this project")
    return data_uri


def _read(data_uri: str):
    from fer_mlflow.data.sources import read_source

    return read_source(data_uri)[0]


def _verified(dataset, data_uri: str, digest: str, given: bool = False):
    """`dataset`, the members' data read from `data_uri` (`given` by the user, or a member's), when it
    has their digest (unchanged since they trained) and a validation split; DataError otherwise."""
    if dataset.digest() != digest and given:
        raise DataError(f"data {data_uri} is data {dataset.digest()}, not the members' {digest}; give the "
                        "dataset they were trained on (for a shipped model: runs:/<clean run>/dataset/dataset.npz "
                        "of the clean entry point on the FER2013 zip, with its defaults)")
    if dataset.digest() != digest:
        raise DataError(f"{data_uri} now reads as data {dataset.digest()}, not the members' {digest}; "
                        "it changed since they trained")
    if len(dataset.split("val")) == 0:
        raise DataError(f"{data_uri} has no validation split to weigh and score the members on")
    return dataset


def _int8_network(model, train, folder: Path) -> tuple[Path | None, Path | None]:
    """`model`'s float32 ONNX export and that export quantized to 8 bits (`runtime.quantize_onnx`), its
    activation ranges calibrated on `runtime.INT8_CALIBRATION_FACES` faces of `train`
    (`runtime.calibration_choice`); either None (warned) when it cannot be made. Where the 8-bit network is refused, the float32
    export is what the model serves, not made twice."""
    exported = runtime.export_onnx(model, folder / "model.onnx")
    if exported is None:
        return None, None
    return exported, runtime.quantize_onnx(exported, folder / "model-int8.onnx",
                                           model_input(train.images[runtime.calibration_choice(len(train))]))


def _member_probabilities(members: list[Member], images: np.ndarray) -> list[np.ndarray]:
    """Each member's probabilities for uint8 `images` (N x 48 x 48), one view, as it predicts."""
    from fer_mlflow.serving.views import Settings, probabilities

    return [probabilities(m.keras_model, model_input(images), Settings()) for m in members]


def _model(member: Member) -> str:
    model = member.run.data.tags.get(MODEL_TAG, "model")
    return model if member.network is None else f"{model}#{member.network}"


def _description(members: list[Member], weights, metrics: dict, int8: bool = False) -> str:
    """The run's description in the UI: each member's run (linked), model, weight and val accuracy."""
    served = " It serves an 8-bit integer network: the figure is that network's." if int8 else ""
    lines = [f"Ensemble of {len(members)} models: **val_accuracy = {metrics['val_accuracy']:.4f}** "
             f"(validation split, one view), the weighted mean of their probabilities.{served}", "",
             "| member | run | model | weight | val_accuracy |", "|---|---|---|---|---|"]
    for index, member in enumerate(members):
        link = f"#/experiments/{member.run.info.experiment_id}/runs/{member.run_id}"
        lines.append(f"| {index} | [{member.name}]({link}) | {_model(member)} | {weights[index]:.4f} | "
                     f"{metrics[f'member_{index}_val_accuracy']:.4f} |")
    return "\n".join(lines)
