"""The `promote` stage: register the best evaluated model and move the `champion` alias to it.

Among the evaluation runs of the current experiment on one test set (one ``fer.test_digest``: by
default that of the newest evaluation), the best by `metric` (higher is better) is registered, once
per source run, and compared with the current champion's score on the same test digest. The
``champion`` alias moves only when the candidate is strictly better; the model it leaves keeps the
alias ``previous``, so `rollback` (or one ``set_registered_model_alias`` call) restores it. Registry
writes happen only after every check has passed, so a failed promote leaves the registry as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fer_mlflow.errors import ConfigError
from fer_mlflow.tracking import log_params, stage_run

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"


@dataclass
class PromoteOutcome:
    """What promote decided: the champion version now, and whether it changed."""

    run_id: str
    champion_version: str
    changed: bool
    message: str


def run(registered_model_name: str = "fer-emotion", metric: str = "test_accuracy",
        test_digest: str = "", rollback: bool = False) -> PromoteOutcome:
    """Promote the best evaluated model of this experiment (see the module docstring)."""
    client = MlflowClient()
    with stage_run("promote", f"promote-{registered_model_name}", {"fer.registered_model": registered_model_name}) as active:
        log_params({"registered_model_name": registered_model_name, "metric": metric,
                    "test_digest": test_digest, "rollback": rollback})
        if rollback:
            version, message = _rollback(client, registered_model_name)
            changed = True
        else:
            version, changed, message = _promote(client, active.info.experiment_id,
                                                 registered_model_name, metric, test_digest)
        mlflow.set_tags({"fer.champion_version": version, "fer.champion_changed": str(changed).lower()})
        log.info(message)
        return PromoteOutcome(active.info.run_id, version, changed, message)


def _promote(client, experiment_id, name, metric, test_digest) -> tuple[str, bool, str]:
    evaluations = client.search_runs(
        [experiment_id], "tags.`fer.stage` = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=5000,
    )
    evaluations = [r for r in evaluations if metric in r.data.metrics and "fer.source_run" in r.data.tags]
    if not evaluations:
        raise ConfigError(f"no finished evaluation with metric {metric} in this experiment; "
                          "run the evaluate entry point first (or check -P metric=...)")
    digest = test_digest or evaluations[0].data.tags["fer.test_digest"]
    same_data = [r for r in evaluations if r.data.tags.get("fer.test_digest") == digest]
    if not same_data:
        raise ConfigError(f"no evaluation on test data with digest {digest}; "
                          "leave -P test_digest empty to use the newest evaluation's")
    best = max(same_data, key=lambda r: r.data.metrics[metric])
    score = best.data.metrics[metric]
    champion = _alias_version(client, name, CHAMPION)
    champion_score = _score_on(client, experiment_id, champion, metric, digest) if champion else None
    candidate = _find_version(client, name, best.data.tags["fer.source_run"])

    if champion and candidate and champion.version == candidate.version:
        return champion.version, False, f"{name} v{champion.version} is already champion ({metric}={score:.4f})"
    if champion_score is not None and score <= champion_score:
        return champion.version, False, (
            f"kept champion {name} v{champion.version} ({metric}={champion_score:.4f}); "
            f"best candidate scores {score:.4f} on test data {digest}")
    if candidate is None:
        candidate = _register(client, name, best, metric, score, digest)
    if champion:
        client.set_registered_model_alias(name, PREVIOUS, champion.version)
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    versus = ("no score on this test data" if champion_score is None else f"{champion_score:.4f}") \
        if champion else "no champion yet"
    return candidate.version, True, (
        f"champion is now {name} v{candidate.version} ({metric}={score:.4f} on test data {digest}; "
        f"previous: {versus})")


def _rollback(client, name) -> tuple[str, str]:
    champion, previous = _alias_version(client, name, CHAMPION), _alias_version(client, name, PREVIOUS)
    if previous is None:
        raise ConfigError(f"{name} has no '{PREVIOUS}' alias to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    if champion:
        client.set_registered_model_alias(name, PREVIOUS, champion.version)
    return previous.version, f"rolled back: champion is {name} v{previous.version} again"


def _alias_version(client, name, alias) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _find_version(client, name, source_run) -> ModelVersion | None:
    """The version registered from `source_run`, if any: a run is registered once."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{source_run}'")
    except MlflowException:
        return None
    return versions[0] if versions else None


def _score_on(client, experiment_id, version: ModelVersion, metric, digest) -> float | None:
    """The champion's best `metric` on test data `digest`, from this experiment's evaluations."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`fer.stage` = 'evaluate' and tags.`fer.source_run` = '{version.run_id}' "
        f"and tags.`fer.test_digest` = '{digest}' and attributes.status = 'FINISHED'",
    )
    values = [r.data.metrics[metric] for r in runs if metric in r.data.metrics]
    return max(values) if values else None


def _register(client, name, evaluation, metric, score, digest) -> ModelVersion:
    source_run = evaluation.data.tags["fer.source_run"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="FER2013 facial-expression models (fer-mlflow)")
    tags = {"metric": metric, metric: f"{score:.6f}", "test_digest": digest, "source_run": source_run,
            "evaluation_run": evaluation.info.run_id,
            "model_family": evaluation.data.tags.get("fer.model_family", ""),
            "model": evaluation.data.tags.get("fer.model", "")}
    model_uri = evaluation.data.tags["fer.model_uri"]
    version = mlflow.register_model(model_uri, name, tags=tags)
    return client.get_model_version(name, version.version)
