"""Small MLflow helpers shared by the stages: runs, names and dataset inputs."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import mlflow

from fer_mlflow.dataset import SPLITS, Dataset


def source_label(data: str) -> str:
    """A short human name for a data source: 'demo', a file or folder name, or a run's short id."""
    if data.startswith("runs:/"):
        return "run-" + data.split("/")[1][:8]
    return Path(data.rstrip("/")).name or data


@contextmanager
def stage_run(stage: str, run_name: str, tags: dict[str, str] | None = None, nested: bool = False):
    """Start (or, under `mlflow run`, resume) the stage's run, named and tagged.

    Leaving the block by an exception ends the run FAILED, so no run is ever left RUNNING.
    """
    with mlflow.start_run(nested=nested) as run:
        mlflow.set_tags({"mlflow.runName": run_name, "fer.stage": stage, **(tags or {})})
        yield run


def log_split_inputs(dataset: Dataset, source: str, name: str, splits: tuple[str, ...] = SPLITS) -> dict:
    """Log each present split of `dataset` as a run input (context = split); returns {split: digest}."""
    digests = {}
    for split in splits:
        part = dataset.split(split)
        if len(part) == 0:
            continue
        digests[split] = part.digest()
        mlflow.log_input(
            mlflow.data.from_numpy(
                part.images, source=_dataset_source(source), targets=part.labels, name=f"{name}/{split}",
                digest=digests[split],
            ),
            context=split,
        )
    return digests


def _dataset_source(uri: str):
    """MLflow's source object for `uri`; a URI it cannot resolve (runs:/, demo) is kept as a tag."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    try:
        with warnings.catch_warnings():  # a local path matches two equivalent resolvers
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(uri)
    except MlflowException:
        return CodeDatasetSource(tags={"uri": uri})


def log_params(params: dict) -> None:
    """Log params to the active run, skipping keys already there.

    Under `mlflow run` the entry point's parameters are logged as the user typed them ("0.10",
    "true"); logging the parsed value again would be refused as a change. Where the user left a
    parameter at "auto", the value it resolved to goes under ``<name>_resolved``.
    """
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params
    fresh = {}
    for key, value in params.items():
        text = _param_text(value)
        if key not in existing:
            fresh[key] = text
        elif existing[key].strip().lower() == "auto" and text.lower() not in ("auto", "none"):
            fresh[f"{key}_resolved"] = text
    if fresh:
        mlflow.log_params(fresh)


def _param_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):  # as typed on the command line: 16,32,128,256
        return ",".join(map(str, value))
    return str(value)
