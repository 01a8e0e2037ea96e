"""Small MLflow helpers shared by the stages: experiments, runs, names and dataset inputs.

Where runs go. The experiment the user chose always wins: ``mlflow run --experiment-name`` /
``--experiment-id``, ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID`` or ``mlflow.set_experiment``.
With none chosen, a stage's run goes to the project's experiment for its data: ``fer-demo`` for the
built-in demo data (and datasets cleaned from it), ``fer2013`` for real data, never MLflow's Default
experiment, where the demo's runs would mix with real ones. `mlflow run` creates its run before the
project's code starts, in Default (id 0) when nothing was chosen, and MLflow has no call to move a
run: so that run is copied (params and tags) into the project's experiment and tagged
``fer.moved_to``, and the stage logs to the copy. `mlflow run` marks its own run FINISHED or FAILED
once the stage's process exits (and fails if it is gone by then), so a small detached process waits
for that and then deletes it. `mlflow run` passes its stages the experiment's id alone, so Default
(id 0) counts as no choice there; ``MLFLOW_EXPERIMENT_NAME=Default`` chooses it.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from fer_mlflow.data.dataset import SPLITS, Dataset
from fer_mlflow.errors import ConfigError
from fer_mlflow.tracking.names import DATA_TAG, DEMO_TAG, STAGE_TAG
from fer_mlflow.tracking.registry import retrying

log = logging.getLogger(__name__)

DEMO_EXPERIMENT, DATA_EXPERIMENT = "fer-demo", "fer2013"
DEMO_MODEL, DATA_MODEL = "fer-emotion-demo", "fer-emotion"
DEFAULT_EXPERIMENT_ID = "0"
# MLflow 3.17's UI opens an experiment without this tag in its GenAI view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def is_demo(data: str) -> bool:
    """Whether `data` is the built-in demo, or a dataset artifact of a run made from it."""
    if data == "demo":
        return True
    if not data.startswith("runs:/"):
        return False
    try:
        run = MlflowClient().get_run(data.split("/")[1])
    except MlflowException:
        return False
    return run.data.tags.get(DEMO_TAG) == "true" or run_params(run).get("data") == "demo"


def data_context(data: str) -> tuple[dict[str, str], str]:
    """The tags that name `data` (``fer.data``: `source_label`; `DEMO_TAG`), and the experiment a
    run on it goes to when the user chose none."""
    demo = is_demo(data)
    return ({DATA_TAG: source_label(data), DEMO_TAG: str(demo).lower()},
            DEMO_EXPERIMENT if demo else DATA_EXPERIMENT)


def source_label(data: str) -> str:
    """A short human name for a data source: 'demo', a file or folder name, or for a run's dataset
    the name of the data that run read (else the run's short id)."""
    if data.startswith("runs:/"):
        run_id = data.split("/")[1]
        try:
            return MlflowClient().get_run(run_id).data.tags[DATA_TAG]
        except (MlflowException, KeyError):
            return "run-" + run_id[:8]
    return Path(data.rstrip("/")).name or data


class Stopped(Exception):
    """Raised inside `stage_run` to end its run KILLED rather than FAILED: stopped on purpose."""


@contextmanager
def stage_run(stage: str, run_name: str, tags: dict[str, str] | None = None, nested: bool = False,
              experiment: str = DATA_EXPERIMENT, resume: str | None = None):
    """Start (or, under `mlflow run`, resume) the stage's run, named and tagged; `experiment` is
    where it goes when the user chose no experiment (see the module docstring). A nested run goes
    to its parent's experiment.

    `resume`: log to that (ended) run instead, which becomes RUNNING again; a run `mlflow run`
    made for this stage is then deleted once it ends, as a moved one is.

    Leaving the block by an exception ends the run FAILED, or KILLED for SIGINT and SIGTERM
    (`interrupts`) and for `Stopped` (a run ended on purpose, e.g. a pruned sweep trial), so no run
    is left RUNNING.
    """
    if nested:
        target = {"nested": True, "experiment_id": mlflow.active_run().info.experiment_id}
    elif resume:
        target = {"run_id": _resumed(resume)}
    else:
        target = _target(experiment)
    with mlflow.start_run(**target) as run:
        mlflow.set_tags({"mlflow.runName": run_name, STAGE_TAG: stage, **(tags or {})})
        _mark_kind(run.info.experiment_id)
        try:
            yield run
        except (KeyboardInterrupt, Stopped):  # SIGINT, SIGTERM (`interrupts`), or on purpose: not failed
            mlflow.end_run("KILLED")
            raise


def user_chose_experiment() -> bool:
    """Whether the user named an experiment (see the module docstring)."""
    return bool(os.environ.get("MLFLOW_EXPERIMENT_NAME")) or \
        os.environ.get("MLFLOW_EXPERIMENT_ID", DEFAULT_EXPERIMENT_ID) not in ("", DEFAULT_EXPERIMENT_ID)


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created (tagged as model training) if missing."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, _artifact_location(client, name), tags=dict([EXPERIMENT_KIND]))
        except MlflowException:  # another process created it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise ConfigError(f"experiment {name} is deleted; restore it (mlflow experiments restore "
                          f"--experiment-id {found.experiment_id}) or choose one with --experiment-name")
    return found.experiment_id


def _artifact_location(client: MlflowClient, name: str) -> str | None:
    """Beside the Default experiment's artifacts when those are local files; else None, for the
    store or server to choose. A local store would otherwise resolve its default root against this
    process's working directory, which under `mlflow run` is the project's folder, not the user's."""
    try:
        location = client.get_experiment(DEFAULT_EXPERIMENT_ID).artifact_location
    except MlflowException:
        return None
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return None
    folder = Path(parsed.path).parent / name
    return folder.as_uri() if parsed.scheme == "file" else str(folder)


def _target(experiment: str) -> dict:
    """`mlflow.start_run` arguments for a top-level stage run."""
    # Taken out of the environment, as MLflow does when it resumes the run itself: left there, a
    # nested start_run (train's clean) would resume this run instead of starting a child.
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    if launched:
        run = MlflowClient().get_run(launched)
        if run.info.experiment_id != DEFAULT_EXPERIMENT_ID or os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            return {"run_id": launched}
        return {"run_id": _moved(run, experiment_id(experiment))}
    if user_chose_experiment():
        return {}
    return {"experiment_id": experiment_id(experiment)}


def _resumed(run_id: str) -> str:
    """`run_id`, after marking the run `mlflow run` made for this stage, if any, for deletion."""
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    if launched and launched != run_id:
        MlflowClient().set_tag(launched, "fer.moved_to", run_id)
        _delete_when_ended(launched)
        log.info("resuming: this stage logs to run %s, not to run %s", run_id, launched)
    return run_id


def _moved(run, target_experiment: str) -> str:
    """Copy `run` (made by `mlflow run` in Default) into `target_experiment`; returns the copy's id."""
    client = MlflowClient()
    copy = client.create_run(target_experiment, tags=dict(run.data.tags), run_name=run.info.run_name)
    params = [Param(key, value) for key, value in run.data.params.items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
        client.log_batch(copy.info.run_id, params=params[start:start + 100])
    client.set_tag(run.info.run_id, "fer.moved_to", copy.info.run_id)
    _delete_when_ended(run.info.run_id)
    name = client.get_experiment(target_experiment).name
    log.info("no experiment chosen: run %s continues as run %s in experiment %s",
             run.info.run_id, copy.info.run_id, name)
    return copy.info.run_id


# Run detached: waits (10 minutes at most) until `mlflow run` has ended the run, then deletes it.
_DELETE_WHEN_ENDED = """
import sys, time
from mlflow import MlflowClient
client, deadline = MlflowClient(), time.monotonic() + 600
while time.monotonic() < deadline:
    if client.get_run(sys.argv[1]).info.status != "RUNNING":
        client.delete_run(sys.argv[1])
        break
    time.sleep(0.5)
"""


def _delete_when_ended(run_id: str) -> None:
    subprocess.Popen([sys.executable, "-c", _DELETE_WHEN_ENDED, run_id], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})


def _mark_kind(experiment: str) -> None:
    """Tag the experiment as model training for the UI, unless it already says what it is."""
    client = MlflowClient()
    if EXPERIMENT_KIND[0] not in client.get_experiment(experiment).tags:
        client.set_experiment_tag(experiment, *EXPERIMENT_KIND)


def log_split_inputs(dataset: Dataset, source: str, name: str, splits: tuple[str, ...] = SPLITS) -> dict:
    """Log each present split of `dataset` as a run input (context = split); returns {split: digest}.
    Retried: two runs logging one dataset at once (sweep workers) race in MLflow's check-then-insert,
    and the loser's second try finds the dataset the winner stored."""
    digests = {}
    for split in splits:
        part = dataset.split(split)
        if len(part) == 0:
            continue
        digests[split] = part.digest()
        retrying(
            mlflow.log_input,
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
        text = param_text(value)
        if key not in existing:
            fresh[key] = text
        elif unquoted(existing[key]).strip().lower() == "auto" and text.lower() not in ("auto", "none"):
            fresh[f"{key}_resolved"] = text
    if fresh:
        mlflow.log_params(fresh)


def metric_by_epoch(client: MlflowClient, run_id: str, key: str) -> list[float]:
    """Run `run_id`'s metric `key`, one value a step (epoch - 1 for training curves): a run resumed from
    a checkpoint logs the epochs after it again, and the value logged last is the one training went on from."""
    last = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))}
    return [last[step] for step in sorted(last)]


def run_params(run) -> dict[str, str]:
    """The params of `run` as their values were given: `mlflow run` logs each entry-point parameter
    quoted for the shell (``shlex.quote``: an empty value is stored as the two characters ``''``, a
    path with a space inside quotes), and that quoting is undone here. Read params back through this
    function, never through ``run.data.params`` directly."""
    return {key: unquoted(value) for key, value in run.data.params.items()}


def unquoted(value: str) -> str:
    """`value` without the shell quoting `mlflow run` adds; a value `shlex.quote` did not make is
    returned as it is."""
    if not value.startswith("'") and not value.endswith("'"):
        return value
    try:
        tokens = shlex.split(value)
    except ValueError:
        return value
    if len(tokens) == 1 and shlex.quote(tokens[0]) == value:
        return tokens[0]
    return value


def param_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):  # as typed on the command line: 16,32,128,256
        return ",".join(map(str, value))
    return str(value)
