"""The `clean` stage: read a FER2013 source, apply the cleaning rules, log the result to MLflow.

Logged to the run:
- params: the source and every rule's setting;
- metrics: ``source/images``, ``source/converted``, ``source/skipped``, ``removed/<rule>``,
  ``removed/total`` and ``images/<split>`` (after cleaning);
- artifacts: ``dataset/dataset.npz`` (the cleaned dataset, which `train` and `evaluate` accept as
  ``data=runs:/<run_id>/dataset/dataset.npz``), ``summary.json`` and figures under ``figures/``;
- inputs: each split of the cleaned dataset, with a content digest.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow

from fer_mlflow.data import dataset as ds
from fer_mlflow.tracking import figures
from fer_mlflow.data.rules import CleanConfig, CleanResult, clean
from fer_mlflow.data.sources import SourceReport, is_artifact, read_source
from fer_mlflow.tracking.runs import (
    data_context, log_params, log_split_inputs, stage_run,
)
from fer_mlflow.tracking.names import DATA_DIGEST_TAG, DATA_TAG

log = logging.getLogger(__name__)

DATASET_ARTIFACT = "dataset/dataset.npz"


@dataclass
class CleanOutcome:
    """What the stage produced: its run, the cleaned dataset and the URI later stages read it from."""

    run_id: str
    result: CleanResult
    dataset_uri: str
    digest: str


def run(
    data: str = "demo",
    config: CleanConfig = CleanConfig(),
    val_fraction: float = 0.1,
    seed: int = 0,
    nested: bool = False,
) -> CleanOutcome:
    """Read `data`, clean it with `config` and log everything to an MLflow run (see module docstring)."""
    tags, experiment = data_context(data)
    label = tags[DATA_TAG]
    with stage_run("clean", f"clean-{label}", tags, nested=nested, experiment=experiment) as active:
        log_params(
            {"data": data, "val_fraction": val_fraction, "seed": seed, **_config_params(config)}
        )
        dataset, report = read_source(data, val_fraction=val_fraction, seed=seed)
        result = clean(dataset, config)
        digest = result.dataset.digest()
        mlflow.set_tag(DATA_DIGEST_TAG, digest)
        mlflow.log_metrics(_metrics(dataset, report, result))
        _log_figures(dataset, result, config)
        summary = _summary(data, report, dataset, result, config, digest)
        mlflow.log_dict(summary, "summary.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(ds.save(result.dataset, Path(tmp) / "dataset.npz")), "dataset")
        log_split_inputs(result.dataset, data, label)
        run_id = active.info.run_id
        log.info("cleaned %s: %s removed; dataset at runs:/%s/%s", label, result.removed_total, run_id,
                 DATASET_ARTIFACT)
    return CleanOutcome(run_id, result, f"runs:/{run_id}/{DATASET_ARTIFACT}", digest)


def load_training_data(data: str, val_fraction: float, seed: int) -> tuple[ds.Dataset, str]:
    """The cleaned dataset for `data` and the URI it was read from.

    A clean run's artifact is used as it is; a raw source is cleaned with the default rules in a
    nested clean run first, so the training run links to a full record of the cleaning.
    """
    if is_artifact(data):
        return read_source(data)[0], data
    outcome = run(data, val_fraction=val_fraction, seed=seed, nested=True)
    return outcome.result.dataset, outcome.dataset_uri


def _config_params(config: CleanConfig) -> dict:
    params = asdict(config)
    params["clean_test"] = "test" in config.splits
    del params["splits"]
    return params


def _metrics(before: ds.Dataset, report: SourceReport, result: CleanResult) -> dict[str, float]:
    metrics = {
        "source/images": len(before),
        "source/converted": report.converted,
        "source/skipped": len(report.skipped),
        "removed/total": result.removed_total,
    }
    metrics.update({f"removed/{rule}": len(idx) for rule, idx in result.removed.items()})
    for split in ds.SPLITS:
        metrics[f"images/{split}"] = int((result.dataset.splits == split).sum())
    return metrics


def _log_figures(before: ds.Dataset, result: CleanResult, config: CleanConfig) -> None:
    import matplotlib.pyplot as plt

    for fig, name in (
        (figures.class_counts(result.dataset, "Images per class after cleaning"), "class_counts.png"),
        (figures.samples_per_class(result.dataset), "samples_per_class.png"),
        (figures.mean_pixel_boxplot(before, config.mean_low, config.mean_high), "mean_pixel_boxplot.png"),
        (figures.removed_images(before, result.removed), "removed_by_rule.png"),
    ):
        mlflow.log_figure(fig, f"figures/{name}")
        plt.close(fig)


def _summary(data, report, before, result, config, digest) -> dict:
    return {
        "schema_version": ds.SCHEMA_VERSION,
        "source": {
            "data": data,
            "kind": report.kind,
            "images_read": len(before),
            "converted": report.converted,
            "skipped": len(report.skipped),
            "skipped_examples": report.skipped[:20],
            "val_taken_from_train": report.val_from_train,
        },
        "config": _config_params(config),
        "images_before": before.counts(),
        "images_after": result.dataset.counts(),
        "removed": {rule: len(idx) for rule, idx in result.removed.items()},
        "removed_by_split": {
            rule: {s: int((before.splits[idx] == s).sum()) for s in ds.SPLITS}
            for rule, idx in result.removed.items()
        },
        "removed_ids": {rule: before.ids[idx].tolist() for rule, idx in result.removed.items()},
        "dataset_digest": digest,
        "dataset_uri": f"runs:/{mlflow.active_run().info.run_id}/{DATASET_ARTIFACT}",
    }

