"""The `pretrained` stage: a shipped model (`fer_mlflow.pretrained`: ``accurate`` by default, or
``fast``) put into the user's tracking store and registry.

A run in the ``fer2013`` experiment (the recorded params, curves and metrics, the model, its lineage
as tags), an evaluation of it (the recorded PublicTest scores, or scored afresh on `data` when
given), then the version registered under ``fer-emotion`` with the alias ``pretrained`` (the
``fast`` variant: ``pretrained-fast``), and
``champion`` only by promote's rules (`promote.consider`): when there is none yet, or when it scores
better on the same test data. Run again, it registers nothing new.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fer_mlflow.pretrained import (
    DEFAULT_VARIANT,
    SHA_TAG,
    alias,
    card_page,
    checked_model_file,
    describe,
    keras_model,
    networks,
    record,
    served_arguments,
)
from fer_mlflow.tracking.names import (
    CHAMPION_CHANGED_TAG,
    DATA_DIGEST_TAG,
    DATA_TAG,
    DEMO_TAG,
    MODEL_FAMILY_TAG,
    MODEL_TAG,
    MODEL_URI_TAG,
    SERVED_MODEL_URI_TAG,
    SETTINGS_TAG,
    SOURCE_RUN_TAG,
    SPLIT_TAG,
    TEST_DIGEST_TAG,
    TRAIN_DATA_DIGEST_TAG,
    TRAIN_DATA_TAG,
)
from fer_mlflow.tracking.runs import DATA_EXPERIMENT, DATA_MODEL, log_params, stage_run

STAGE = "pretrained"
CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")  # drawn in the training-curves figure


@dataclass
class PretrainedOutcome:
    """The shipped model's training run in this store, its registered version, and what happened."""

    run_id: str
    version: str
    champion: bool
    message: str


def run(data: str = "", variant: str = DEFAULT_VARIANT) -> PretrainedOutcome:
    """Put the shipped `variant` into this tracking store and registry (see the module docstring).
    `data`: test data to score it on afresh (any source `evaluate` reads); empty: its recorded
    PublicTest scores."""
    found = record(variant)
    checked_model_file(variant)
    try:
        return _run(found, data, variant)
    except MlflowException as error:
        from fer_mlflow.errors import FerError, RegistryError
        from fer_mlflow.tracking.registry import first_line

        if isinstance(error.__context__, FerError):  # ending the run failed too: the first error counts
            raise error.__context__ from error
        raise RegistryError(f"the tracking server or registry at {mlflow.get_tracking_uri()} failed "
                            f"({first_line(error)}); run it again once it answers (it registers nothing "
                            "twice, and promote's aliases are put back when their writing fails)") from error


def _run(found: dict, data: str, variant: str) -> PretrainedOutcome:
    from fer_mlflow.stages import promote
    from fer_mlflow.tracking.registry import alias_version

    client = MlflowClient()
    with stage_run(STAGE, f"pretrained {found['title']}", {SHA_TAG: found["sha256"]},
                   experiment=DATA_EXPERIMENT) as active:
        log_params({"data": data, "variant": variant})
        earlier = _logged_before(client, found["sha256"], active.info.run_id)
        if earlier is None:
            _log_training(found, variant)
            training = active.info.run_id
        else:
            training = earlier.info.run_id
            mlflow.set_tags({"fer.pretrained_run": training, "mlflow.runName": f"pretrained (already in run {training[:8]})"})
            registered = _registered_before(client, training)
            champion = alias_version(client, DATA_MODEL, promote.CHAMPION)
            # With no champion (its alias removed since), the version goes on to be considered for it.
            if registered is not None and not data and champion is not None:
                _set_alias(client, registered, variant)
                message = (f"the shipped model is already {DATA_MODEL} v{registered} (alias {alias(variant)}, run "
                           f"{training}); nothing new registered")
                return PretrainedOutcome(training, registered, str(champion.version) == registered, message)
        evaluation = _evaluation(found, training, data)
        evaluate_champion = bool(data) or Path(evaluation.data.params.get("data_uri", "")).exists()
        version, changed, decided = promote.consider(evaluation, "test_accuracy", DATA_MODEL, evaluate_champion)
        version = _first_of_its_file(client, found["sha256"], str(version))
        _set_alias(client, version, variant)
        champion = alias_version(client, DATA_MODEL, promote.CHAMPION)
        mlflow.set_tags({"fer.registered_version": version, CHAMPION_CHANGED_TAG: str(changed).lower()})
        message = f"registered {describe(variant)} as {DATA_MODEL} v{version} (alias {alias(variant)}); {decided}"
        return PretrainedOutcome(training, version, champion is not None and str(champion.version) == version, message)


def _logged_before(client: MlflowClient, sha256: str, current: str):
    """The run that logged this very model (same SHA-256) before, if any: finished, or ended by a
    failure after its model was logged (the registry failing after it), whose version a rerun takes up."""
    runs = _runs_of_file(client, sha256, " and attributes.status != 'RUNNING'")
    return next((r for r in runs if r.info.run_id != current and MODEL_URI_TAG in r.data.tags), None)


def _runs_of_file(client: MlflowClient, sha256: str, where: str = "") -> list:
    """The `pretrained` runs of the shipped file `sha256` in every experiment (and `where`), oldest first."""
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{SHA_TAG}` = '{sha256}' and tags.`fer.stage` = '{STAGE}'{where}",
                              order_by=["attributes.start_time ASC"])


def _first_of_its_file(client: MlflowClient, sha256: str, version: str) -> str:
    """The lowest version registered from a `pretrained` run of this very file. Two commands at once
    each log a run and register a version (neither sees the other's run finished): the later version is
    deleted again, its aliases moved to the first, so the file is registered once."""
    from fer_mlflow.tracking.registry import aliases, retrying, versions

    runs = {r.info.run_id for r in _runs_of_file(client, sha256)}
    first = next((str(v.version) for v in versions(client, DATA_MODEL)
                  if (v.tags.get("source_run") or v.run_id) in runs), version)
    if first != version:
        for name, holder in aliases(client, DATA_MODEL).items():
            if str(holder) == version:
                retrying(client.set_registered_model_alias, DATA_MODEL, name, first)
        retrying(client.delete_model_version, DATA_MODEL, version)
    return first


def _registered_before(client: MlflowClient, training: str) -> str | None:
    """The version of `DATA_MODEL` registered from run `training`, if any (the lowest)."""
    from fer_mlflow.tracking.registry import versions

    found = [v for v in versions(client, DATA_MODEL) if (v.tags.get("source_run") or v.run_id) == training]
    return str(found[0].version) if found else None


def _set_alias(client: MlflowClient, version: str, variant: str) -> None:
    from fer_mlflow.tracking.registry import retrying

    retrying(client.set_registered_model_alias, DATA_MODEL, alias(variant), version)


def _log_training(found: dict, variant: str) -> None:
    """Log the shipped model's training to the active run: its params, per-epoch curves, final
    metrics, curves figure, lineage tags and the served model."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric

    from fer_mlflow.serving import pyfunc_model
    from fer_mlflow.learning.loop import curves_figure

    training = found["training"]
    log_params(training["params"])
    now = int(mlflow.active_run().info.start_time)
    for prefix, title, history in _histories(found):
        curves = [Metric(f"{prefix}{key}", float(value), now, step) for key, values in history.items()
                  for step, value in enumerate(values)]
        for start in range(0, len(curves), 1000):  # MLflow takes at most 1,000 metrics a batch
            MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=curves[start:start + 1000])
        figure = curves_figure({k: v for k, v in history.items() if k in CURVES}, title)
        name = f"training_curves_{prefix.rstrip('/')}" if prefix else "training_curves"
        mlflow.log_figure(figure, f"figures/{name}.png")
        plt.close(figure)
    mlflow.log_metrics(training["metrics"])
    mlflow.log_dict(found, "pretrained_record.json")
    info = pyfunc_model.log_model(keras_model(variant), name="model", **served_arguments(variant))
    mlflow.set_tags({
        MODEL_URI_TAG: info.model_uri, MODEL_TAG: found["model"], MODEL_FAMILY_TAG: found["model_family"],
        DATA_TAG: training["data"], DATA_DIGEST_TAG: training["data_digest"], DEMO_TAG: "false",
        "fer.pretrained": "true", "fer.pretrained_variant": variant, "fer.made_at_commit": found["made"]["commit"],
        "fer.made_in_run": training["run_id"],
        "mlflow.note.content": _note(found, variant),
    })


def _histories(found: dict) -> list[tuple[str, str, dict]]:
    """(metric prefix, title, per-epoch curves) of the shipped network's training: one network's
    curves under their own names, an ensemble's members' under ``member_<i>/``."""
    if not found["training"].get("members"):
        return [("", found["title"], found["training"]["history"])]
    return [(f"member_{index}/", f"{found['title']}: member {index}, {member.get('title', '')}", member["history"])
            for index, member in enumerate(networks(found))]


def _evaluation(found: dict, training: str, data: str):
    """The evaluation the shipped model is a candidate by: scored afresh on `data` (the evaluate
    stage, nested), or, with no data, its recorded PublicTest scores logged as an evaluation nested
    under the active run and tagged ``fer.recorded=true``."""
    from fer_mlflow.stages import evaluate
    from fer_mlflow.serving.views import Settings

    if data:
        return mlflow.get_run(evaluate.run(run_id=training, data=data, nested=True).run_id)
    scored, source = found["evaluation"], mlflow.get_run(training)
    settings = Settings(**found["settings"])
    tags = {SOURCE_RUN_TAG: training, SETTINGS_TAG: settings.key, SPLIT_TAG: scored["split"],
            TEST_DIGEST_TAG: scored["digest"], DATA_TAG: scored["data"], DEMO_TAG: "false",
            "fer.trained_on_demo": "false", SERVED_MODEL_URI_TAG: source.data.tags[MODEL_URI_TAG],
            MODEL_URI_TAG: source.data.tags[MODEL_URI_TAG], "fer.recorded": "true",
            MODEL_TAG: source.data.tags.get(MODEL_TAG, ""),
            MODEL_FAMILY_TAG: source.data.tags.get(MODEL_FAMILY_TAG, ""),
            TRAIN_DATA_TAG: source.data.tags.get(DATA_TAG, ""),
            TRAIN_DATA_DIGEST_TAG: source.data.tags.get(DATA_DIGEST_TAG, "")}
    with stage_run("evaluate", f"evaluate pretrained {scored['split']} {settings.describe()} (recorded)", tags,
                   nested=True) as active:
        log_params({"run_id": training, "data_uri": scored["data_uri"], "split": scored["split"],
                    "images": scored["images"], "tta": settings.tta, "tta_views": settings.view_count,
                    "recorded_at_commit": found["made"]["commit"]})
        mlflow.log_metrics(scored["metrics"])
        _log_confusion(scored)
    return mlflow.get_run(active.info.run_id)


def _log_confusion(scored: dict) -> None:
    """The recorded confusion matrix and per-class scores, logged as evaluate logs them."""
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from fer_mlflow.tracking import figures

    classes, counts = scored["classes"], np.array(scored["confusion_matrix"])
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    mlflow.log_dict({"classes": classes, "counts": counts.tolist(), "normalised": normalised.round(4).tolist()},
                    "confusion_matrix.json")
    with tempfile.TemporaryDirectory() as folder:
        pd.DataFrame({"class": classes, **scored["per_class"]}).to_csv(Path(folder) / "per_class_metrics.csv",
                                                                        index=False)
        mlflow.log_artifacts(folder)
    for matrix, title, name in ((counts, "counts", "confusion_matrix.png"),
                                (normalised, "row-normalised", "confusion_matrix_normalised.png")):
        figure = figures.confusion(matrix, classes, f"Confusion matrix ({title}), recorded")
        mlflow.log_figure(figure, f"figures/{name}")
        plt.close(figure)


def _note(found: dict, variant: str) -> str:
    """The run's description in the UI: what the model is and where its card is."""
    scored = found["evaluation"]
    return "\n".join([
        f"**The shipped model** ({variant}): {found['title']}, trained by this project on `{found['training']['data']}` "
        f"(digest `{found['training']['data_digest']}`) in {found['training']['minutes']:.0f} minutes, "
        f"{found['training']['epochs']} epochs"
        + (f" ({len(networks(found))} networks together)" if found["training"].get("members") else "")
        + f", at commit `{found['made']['commit']}`.",
        "",
        f"- {scored['split']}_accuracy **{scored['metrics']['test_accuracy']:.4f}** on {scored['data']} "
        f"{scored['part']} ({scored['images']} faces) as served ({found['settings_described']})",
        f"- SHA-256 of model.keras: `{found['sha256']}`",
        f"- model card: docs/{card_page(variant)} in the project",
    ])
