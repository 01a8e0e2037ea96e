"""The `main` entry point: clean, train each model, evaluate each, promote the best.

With `ensemble`, the trained models are also combined (`ensemble` stage, equal weights) and the
ensemble evaluated, so promote chooses among the single models and their ensemble.

Each step is an `mlflow.run` of this project's own entry point, in a child run of one parent run
(created first and handed over with ``run_id``, so the UI nests them). Child runs get
``env_manager="local"`` from here: the CLI's ``--env-manager`` does not reach them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import psutil
from mlflow import MlflowClient
from mlflow.exceptions import ExecutionException, MlflowException

from fer_mlflow.errors import FerError
from fer_mlflow.tracking.runs import data_context, log_params, stage_run
from fer_mlflow.tracking.names import REGISTERED_MODEL_TAG

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
# How long a stopped step may take to log what it has and exit before it is killed outright.
STOP_SECONDS = 180
# Where `mlflow ui` serves by default.
DEFAULT_UI = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class PipelineOutcome:
    champion_uri: str
    experiment_id: str


def ui_link(experiment_id: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """The address that opens the experiment's runs in MLflow's model-training view, and the command
    that serves it (None where `tracking_uri`, by default the current one, is a tracking server,
    which serves its own UI).

    Without ``workflowType=machine_learning`` MLflow 3.17's UI opens a new browser on its GenAI
    overview instead of the runs."""
    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        # Host and port only: a password in the tracking URI is not printed.
        port = f":{parts.port}" if parts.port else ""
        base, command = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}", None
    else:
        base, command = DEFAULT_UI, f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning", command


def run(data: str = "demo", models: str = "cnn,resnet50", epochs: str = "5", image_size: str = "48",
        weights: str = "auto", registered_model_name: str = "auto",
        metric: str = "auto", ensemble: bool = False) -> PipelineOutcome:
    """Run the whole pipeline; returns the champion's model URI (``fer-emotion-demo`` for the demo
    data unless `registered_model_name` says otherwise: `promote.run`) and the experiment of its runs."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise FerError("models is empty; name one or more of cnn, cnn_shallow, cnn_deep, resnet50, ...")
    if ensemble and len(names) < 2:
        raise FerError(f"ensemble=true needs two or more models, got models={models}; "
                       "name more (e.g. -P models=cnn,resnet50) or leave ensemble off")
    tags, experiment = data_context(data)
    with stage_run("main", f"pipeline-{tags['fer.data']}", tags, experiment=experiment) as parent:
        log_params({"data": data, "models": models, "epochs": epochs, "image_size": image_size,
                    "weights": weights, "registered_model_name": registered_model_name, "metric": metric,
                    "ensemble": ensemble})
        step = _Steps(parent.info.run_id, parent.info.experiment_id)
        cleaned = step("clean", {"data": data})
        dataset_uri = f"runs:/{cleaned}/dataset/dataset.npz"
        trained = []
        for name in names:
            trained.append(step("train", {"model": name, "data": dataset_uri, "epochs": epochs,
                                          "image_size": image_size, "weights": weights}))
            step("evaluate", {"run_id": trained[-1]})
        if ensemble:
            step("evaluate", {"run_id": step("ensemble", {"runs": ",".join(trained)})})
        promoted = step("promote", {"registered_model_name": registered_model_name, "metric": metric})
        name = step.client.get_run(promoted).data.tags[REGISTERED_MODEL_TAG]
        uri = f"models:/{name}@champion"
        mlflow.set_tag("fer.champion_uri", uri)
    return PipelineOutcome(uri, parent.info.experiment_id)


class _Steps:
    """Runs one entry point of this project in a new child run of the parent run."""

    def __init__(self, parent_id: str, experiment_id: str):
        self.parent_id, self.experiment_id = parent_id, experiment_id
        self.client = MlflowClient()

    def __call__(self, entry_point: str, parameters: dict) -> str:
        child = self.client.create_run(self.experiment_id, run_name=entry_point,
                                       tags={"mlflow.parentRunId": self.parent_id})
        try:
            submitted = mlflow.run(str(PROJECT_DIR), entry_point, parameters=parameters,
                                   env_manager="local", run_id=child.info.run_id,
                                   experiment_id=self.experiment_id, synchronous=False)
        except (ExecutionException, MlflowException) as error:
            raise FerError(f"the {entry_point} step could not start (run {child.info.run_id}): "
                           f"{str(error).splitlines()[0]}") from error
        try:
            succeeded = submitted.wait()
        except KeyboardInterrupt:
            # The step runs in its own process group, which a Ctrl-C on the terminal does not
            # reach: pass the stop on (SIGTERM; it logs what it has and ends KILLED) and wait.
            log.warning("stopping the %s step (run %s)", entry_point, child.info.run_id)
            _stop(submitted)
            self._end(child.info.run_id, "KILLED")
            raise
        if not succeeded:
            self._end(child.info.run_id, "FAILED")
            raise FerError(f"the {entry_point} step failed (run {child.info.run_id}); its error is printed above")
        return submitted.run_id

    def _end(self, run_id: str, status: str) -> None:
        """End the step's run with `status` unless it ended itself (a step killed outright cannot)."""
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status)


def _stop(submitted) -> None:
    """Stop a step and wait until every process of it has exited.

    MLflow's `cancel` sends SIGTERM to the step's process group but waits only for the group's
    leader (the shell): the training process beneath it, still logging its best model, would
    outlive `main`. Each one gets `STOP_SECONDS` to finish, then SIGKILL."""
    try:
        leader = psutil.Process(submitted.command_proc.pid)
        family = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    submitted.cancel()
    _, alive = psutil.wait_procs(family, timeout=STOP_SECONDS)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
