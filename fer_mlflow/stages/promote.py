"""The `promote` stage: register the best evaluated model and move the `champion` alias to it.

The rules:
1. Candidates are this experiment's finished evaluations on one `split` (default test) of one data
   set (one ``fer.test_digest``: the newest evaluation's, or `test_digest`), ranked by `metric`
   (default ``<split>_accuracy``, higher is better). A candidate is a model *as served*: its training
   run and its predict settings (``fer.settings``: test-time views on or off), so a ten-view score
   only ever stands for a model that serves with ten views by default.
2. The champion is compared on the same data, split and metric, as it serves. When it has no such
   score, in any experiment (evaluations are found by model version, not by experiment), promote
   evaluates it first in a nested evaluate run.
3. The alias moves only to a strictly better model; the version it leaves gets ``previous``. Each
   served model is registered once (a concurrent duplicate is deleted again), tagged and described
   with its metric, value, data, settings, source run and training data.
4. `rollback` gives ``champion`` back to ``previous`` and tags the version it leaves rejected (who
   and when); promote skips rejected versions unless `include_rejected`.
5. Registry writes are checked, not assumed: after writing, promote re-reads the aliases and the
   scores of every version on this data, and writes again until the champion is the best of them
   and ``previous`` is another version. So two promotes at once end in the same right state.
6. A registry that fails, even after retries, is never read as "no versions" or "no champion":
   promote fails in one line and leaves the aliases as they were (`registry.restoring` puts back
   any it had begun to move).

`registered_model_name` "auto" is ``fer-emotion-demo`` for a model trained or scored on the built-in
demo data, ``fer-emotion`` otherwise, so the demo never replaces a model trained on real data; in an
experiment holding both kinds, the candidates are those of the newest evaluation's kind, so a
demo-trained model never takes the place of the real candidates (nor the reverse).
Nothing is written to the registry before every check has passed.
"""

from __future__ import annotations

import getpass
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fer_mlflow.errors import ConfigError, FerError, RegistryError
from fer_mlflow.tracking.registry import AliasWriter, alias_version, ensure_model, first_line, restoring, retrying, versions
from fer_mlflow.tracking.runs import (
    DATA_EXPERIMENT, DATA_MODEL, DEMO_EXPERIMENT, DEMO_MODEL, DEMO_TAG, log_params, run_params, stage_run,
)
from fer_mlflow.serving.views import Settings
from fer_mlflow.tracking.names import (
    CHAMPION_CHANGED_TAG,
    DATA_TAG,
    EVALUATED_SPLITS,
    MODEL_FAMILY_TAG,
    MODEL_TAG,
    MODEL_URI_TAG,
    REGISTERED_MODEL_TAG,
    SERVED_MODEL_URI_TAG,
    SETTINGS_TAG,
    SOURCE_RUN_TAG,
    SPLIT_TAG,
    TEST_DIGEST_TAG,
    TRAINED_ON_DEMO_TAG,
    TRAIN_DATA_DIGEST_TAG,
    TRAIN_DATA_TAG,
)

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"
AUTO = "auto"
PLAIN = Settings().key  # what versions registered before settings were recorded serve with
WRITE_ATTEMPTS = 8  # rounds of write-and-check before promote gives up


@dataclass
class PromoteOutcome:
    """What promote decided: the registered model, its champion version now, and whether it changed."""

    run_id: str
    champion_version: str
    changed: bool
    message: str
    registered_model_name: str


@dataclass(frozen=True)
class Candidate:
    """One evaluation: a model as served (training run + settings) and its score."""

    evaluation: Run
    score: float

    @property
    def key(self) -> tuple[str, str]:
        tags = self.evaluation.data.tags
        return tags[SOURCE_RUN_TAG], tags[SETTINGS_TAG]

    @property
    def demo(self) -> bool:
        tags = self.evaluation.data.tags
        return tags.get(DEMO_TAG) == "true" or tags.get(TRAINED_ON_DEMO_TAG) == "true"


def run(registered_model_name: str = AUTO, metric: str = AUTO, test_digest: str = "",
        rollback: bool = False, split: str = "test", include_rejected: bool = False) -> PromoteOutcome:
    """Promote the best evaluated model of this experiment (see the module docstring)."""
    if split not in EVALUATED_SPLITS:
        raise ConfigError(f"split={split} is not one of {', '.join(EVALUATED_SPLITS)}")
    metric = f"{split}_accuracy" if metric in ("", AUTO) else metric
    if not metric.startswith(f"{split}_"):
        raise ConfigError(f"metric {metric} is not one of the {split} split's; "
                          f"use {split}_accuracy, {split}_f1_macro, ... or -P split=...")
    name = "" if registered_model_name in ("", AUTO) else registered_model_name
    client = MlflowClient()
    experiment = DEMO_EXPERIMENT if name == DEMO_MODEL else DATA_EXPERIMENT
    decided = ""  # what promote wrote, once it has
    try:
        with stage_run("promote", f"promote by {metric}", experiment=experiment) as active:
            log_params({"registered_model_name": registered_model_name, "metric": metric, "split": split,
                        "test_digest": test_digest, "rollback": rollback, "include_rejected": include_rejected})
            if rollback:
                if not name:
                    demo = client.get_experiment(active.info.experiment_id).name == DEMO_EXPERIMENT
                    name = DEMO_MODEL if demo else DATA_MODEL
                version, message = _rollback(client, name, active)
                changed = True
            else:
                best, pool_digest = _best_candidate(client, active.info.experiment_id, name, metric, split,
                                                    test_digest, include_rejected)
                name = name or (DEMO_MODEL if best.demo else DATA_MODEL)
                decision = _Decision(client, name, best, metric, split, pool_digest, include_rejected)
                version, changed, message = decision.make()
            decided = message
            mlflow.set_tags({"mlflow.runName": f"promote {name} by {metric}{' (rollback)' if rollback else ''}",
                             REGISTERED_MODEL_TAG: name, "fer.champion_version": str(version),
                             CHAMPION_CHANGED_TAG: str(changed).lower()})
            log.debug(message)  # the CLI prints the outcome's message; a caller has it returned
            return PromoteOutcome(active.info.run_id, str(version), changed, message, name)
    except MlflowException as error:
        # Ending the run FAILED needs the server too: that failure must not hide the first one.
        if isinstance(error.__context__, FerError):
            raise error.__context__ from error
        done = f"the registry holds what promote decided ({decided})" if decided else "promote moved no alias"
        raise RegistryError(f"the tracking server or registry at {mlflow.get_tracking_uri()} failed "
                            f"({first_line(error)}); {done}; run it again once it answers") from error


def consider(evaluation: Run, metric: str, name: str, evaluate_champion: bool = True) -> tuple[str, bool, str]:
    """Register the served model of one finished `evaluation` under `name` and make it champion by
    promote's rules (`_Decision`): when there is none, or when it scores better by `metric` on the same
    data and split. With `evaluate_champion` False, a champion with no score on that data is not
    evaluated there: the version is registered and the champion kept, and the message says how to
    compare them. Returns the candidate's version, whether the champion changed, and a message."""
    client = MlflowClient()
    tags = evaluation.data.tags
    split, digest = tags.get(SPLIT_TAG, "test"), tags[TEST_DIGEST_TAG]
    decision = _Decision(client, name, Candidate(evaluation, evaluation.data.metrics[metric]), metric, split, digest)
    version = str(decision._registered().version)  # registered whatever the champion: it has its own alias
    champion = alias_version(client, name, CHAMPION)
    if champion is not None and not evaluate_champion and _key(champion) not in decision._search():
        return version, False, (
            f"kept champion {name} v{champion.version}: it has no {metric} on this {split} data ({digest}); "
            "score both on the same data to compare them (pass the data, or evaluate the champion on it)")
    _, changed, message = decision.make()
    return version, changed, message


def _best_candidate(client, experiment_id, name, metric, split, test_digest, include_rejected):
    """The best non-rejected candidate of the experiment's evaluations, and the test digest."""
    evaluations = client.search_runs(
        [experiment_id], "tags.`fer.stage` = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=5000,
    )
    evaluations = [r for r in evaluations if metric in r.data.metrics and SOURCE_RUN_TAG in r.data.tags
                   and SETTINGS_TAG in r.data.tags and r.data.tags.get(SPLIT_TAG, "test") == split]
    if not evaluations:
        where = client.get_experiment(experiment_id).name
        raise ConfigError(f"no finished evaluation with metric {metric} on the {split} split in experiment "
                          f"{where}; run the evaluate entry point first (-P split={split}), promote in the "
                          "experiment of your evaluations (--experiment-name ...), or check -P metric=...")
    digest = test_digest or evaluations[0].data.tags[TEST_DIGEST_TAG]
    pool = [Candidate(r, r.data.metrics[metric]) for r in evaluations if r.data.tags[TEST_DIGEST_TAG] == digest]
    if not pool:
        raise ConfigError(f"no evaluation on {split} data with digest {digest}; "
                          "leave -P test_digest empty to use the newest evaluation's")
    if not name:  # auto: demo and real models never compete; the newest evaluation's kind decides
        pool = [c for c in pool if c.demo == pool[0].demo]
    pool.sort(key=lambda c: c.score, reverse=True)
    if include_rejected:
        return pool[0], digest
    rejected: dict[str, set] = {}  # registered model -> keys of its rejected versions
    for candidate in pool:
        model = name or (DEMO_MODEL if candidate.demo else DATA_MODEL)
        if model not in rejected:
            rejected[model] = {_key(v) for v in _versions(client, model) if v.tags.get("rejected") == "true"}
        if candidate.key not in rejected[model]:
            return candidate, digest
        log.info("skipping rejected model %s %s", *candidate.key)
    raise ConfigError(f"every candidate on data {digest} is a rejected version; "
                      "pass -P include_rejected=true to consider them again")


class _Decision:
    """Compare `best` with the champion of `name`, and write the aliases until they hold."""

    def __init__(self, client: MlflowClient, name: str, best: Candidate, metric: str, split: str, digest: str,
                 include_rejected: bool = False):
        self.client, self.name, self.best = client, name, best
        self.metric, self.split, self.digest = metric, split, digest
        self.include_rejected = include_rejected

    def make(self) -> tuple[str, bool, str]:
        with restoring(self.client, self.name, (CHAMPION, PREVIOUS)) as writer:
            return self._settle(writer)

    def _settle(self, writer: AliasWriter) -> tuple[str, bool, str]:
        changed, old = False, alias_version(self.client, self.name, CHAMPION)
        for _ in range(WRITE_ATTEMPTS):
            champion = alias_version(self.client, self.name, CHAMPION)
            previous = alias_version(self.client, self.name, PREVIOUS)
            scores = self._scores(champion)
            top = self._top(champion, scores)
            settled = champion is not None and top.version == champion.version
            if settled and (previous is None or previous.version != champion.version):
                return champion.version, changed, self._message(old, champion, scores, changed)
            if not settled:
                if champion is not None:
                    writer.set(PREVIOUS, champion.version)
                writer.set(CHAMPION, top.version)
                if top.tags.get("rejected") == "true":  # chosen again with include_rejected
                    retrying(self.client.delete_model_version_tag, self.name, top.version, "rejected")
                changed = True
            else:  # previous names the champion itself: a concurrent write left it so
                writer.delete(PREVIOUS)
            time.sleep(random.uniform(0.2, 0.6))  # let a concurrent promote's writes land, then check
        raise ConfigError(f"the aliases of {self.name} kept changing under promote (another promote "
                          "running?); run promote again")

    def _top(self, champion: ModelVersion | None, scores: dict) -> ModelVersion:
        """The version that should be champion: the best scored non-rejected version, the candidate
        registered only if it beats the champion; the champion wins ties."""
        versions = [v for v in _versions(self.client, self.name) if _key(v) in scores
                    and (self.include_rejected or v.tags.get("rejected") != "true")]
        holds = lambda v: champion is not None and v.version == champion.version  # noqa: E731
        ranked = sorted(versions, key=lambda v: (scores[_key(v)], holds(v), -int(v.version)), reverse=True)
        leader = scores[_key(ranked[0])] if ranked else None
        if leader is None or self.best.score > leader:
            return self._registered()
        return ranked[0]

    def _scores(self, champion: ModelVersion | None) -> dict[tuple[str, str], float]:
        """Best `metric` per served model on this data and split, from every experiment; the
        champion is evaluated first when it has no score here."""
        scores = self._search()
        if champion is not None and _key(champion) not in scores:
            self._evaluate(champion)
            scores = self._search()
        if champion is not None and _key(champion) not in scores:  # no run to key its score by: never "unscored"
            raise ConfigError(f"champion {self.name} v{champion.version} names no training run of this store "
                              "(registered by hand from a model folder?), so promote cannot compare it; move or "
                              f"delete its alias (MlflowClient().delete_registered_model_alias('{self.name}', "
                              f"'{CHAMPION}')), then promote again")
        scores[self.best.key] = max(scores.get(self.best.key, self.best.score), self.best.score)
        return scores

    def _search(self) -> dict[tuple[str, str], float]:
        runs = mlflow.search_runs(
            search_all_experiments=True, output_format="list", max_results=50000,
            filter_string=f"tags.`fer.stage` = 'evaluate' and tags.`fer.test_digest` = '{self.digest}' "
                          "and attributes.status = 'FINISHED'")
        scores: dict[tuple[str, str], float] = {}
        for found in runs:
            tags = found.data.tags
            if (self.metric in found.data.metrics and SOURCE_RUN_TAG in tags and SETTINGS_TAG in tags
                    and tags.get(SPLIT_TAG, "test") == self.split):
                key = (tags[SOURCE_RUN_TAG], tags[SETTINGS_TAG])
                scores[key] = max(scores.get(key, float("-inf")), found.data.metrics[self.metric])
        return scores

    def _evaluate(self, champion: ModelVersion) -> None:
        """Score the champion as it serves on the candidate's data and split (a nested run)."""
        from fer_mlflow.stages import evaluate

        data = self._candidate_data()
        log.info("champion %s v%s has no %s on this data: evaluating it first",
                 self.name, champion.version, self.metric)
        scored = evaluate.run(model_uri=f"models:/{self.name}/{champion.version}", data=data,
                              split=self.split, nested=True)
        if scored.test_digest != self.digest:  # the data changed since: no score to compare with
            raise ConfigError(f"{data} now reads as {self.split} data {scored.test_digest}, not the "
                              f"candidate's {self.digest}; evaluate the candidate again, then promote")

    def _candidate_data(self) -> str:
        """The data the candidate was evaluated on: its `data_uri`, else the `data` it was given,
        else (given none: evaluate's default) its training run's data."""
        evaluation = self.best.evaluation
        params = run_params(evaluation)
        data = params.get("data_uri") or params.get("data")
        if not data:
            source_run = evaluation.data.tags[SOURCE_RUN_TAG]
            data = run_params(retrying(self.client.get_run, source_run)).get("data_uri")
        if not data:
            raise ConfigError(f"the candidate's evaluation {evaluation.info.run_id} records no data; "
                              "evaluate the champion on it yourself (-P model_uri=models:/...)")
        return data

    def _registered(self) -> ModelVersion:
        """The version of the candidate, registered once: when two promotes register it at once,
        the lower version number is kept and the other deleted."""
        if not (existing := _versions(self.client, self.name, self.best.key)):
            ensure_model(self.client, self.name, "Facial-expression models (fer-mlflow): 7 emotions from "
                                                 "48x48 grayscale faces")
            created = retrying(mlflow.register_model, self._source_uri(), self.name, tags=self._tags())
            existing = _versions(self.client, self.name, self.best.key)
            if existing and existing[0].version != created.version:
                retrying(self.client.delete_model_version, self.name, created.version)
            else:
                retrying(self.client.update_model_version, self.name, created.version, self._description())
            existing = existing or [retrying(self.client.get_model_version, self.name, created.version)]
        return existing[0]

    def _tags(self) -> dict[str, str]:
        tags = self.best.evaluation.data.tags
        source_run, settings = self.best.key
        found = {"metric": self.metric, self.metric: f"{self.best.score:.6f}", "split": self.split,
                 "test_digest": self.digest, "test_data": tags.get(DATA_TAG, ""), "settings": settings,
                 "source_run": source_run, "evaluation_run": self.best.evaluation.info.run_id,
                 "model": tags.get(MODEL_TAG, ""), "model_family": tags.get(MODEL_FAMILY_TAG, ""),
                 "train_data": tags.get(TRAIN_DATA_TAG, ""),
                 "train_data_digest": tags.get(TRAIN_DATA_DIGEST_TAG, "")}
        if (reported := self._reported_test()) is not None:
            found.update({"reported_test_accuracy": f"{reported.data.metrics['test_accuracy']:.6f}",
                          "reported_test_digest": reported.data.tags[TEST_DIGEST_TAG],
                          "reported_test_data": reported.data.tags.get(DATA_TAG, "")})
        return found

    def _reported_test(self) -> Run | None:
        """Chosen on val: the newest test evaluation of the same served model, to report."""
        if self.split == "test":
            return None
        source_run, settings = self.best.key
        found = mlflow.search_runs(
            search_all_experiments=True, output_format="list", order_by=["attributes.start_time DESC"],
            filter_string=f"tags.`fer.stage` = 'evaluate' and tags.`{SOURCE_RUN_TAG}` = '{source_run}' "
                          f"and tags.`fer.settings` = '{settings}' and tags.`fer.split` = 'test' "
                          "and attributes.status = 'FINISHED'")
        return next((r for r in found if "test_accuracy" in r.data.metrics), None)

    def _description(self) -> str:
        evaluation = self.best.evaluation
        tags, params = evaluation.data.tags, run_params(evaluation)
        source_run, settings = self.best.key
        experiment = evaluation.info.experiment_id
        figure = "figures/confusion_matrix_normalised.png"
        run_link = f"#/experiments/{experiment}/runs/{evaluation.info.run_id}"
        reported = self._reported_test()
        report = [] if reported is None else [
            f"- reported on test: **test_accuracy = {reported.data.metrics['test_accuracy']:.4f}** on "
            f"`{reported.data.tags.get('fer.data', '?')}` (digest `{reported.data.tags['fer.test_digest']}`), "
            "chosen on validation data"]
        return "\n".join([
            f"**{self.metric} = {self.best.score:.4f}** on the {self.split} split of "
            f"`{tags.get('fer.data', '?')}` ({params.get('images', '?')} images, digest "
            f"`{self.digest}`), predicting with `{settings}` by default: `predict` with no params "
            "reproduces this figure.",
            "",
            f"- model: `{tags.get('fer.model', '?')}`, trained in run `{source_run}` on "
            f"`{tags.get('fer.train_data', '?')}` (data digest `{tags.get('fer.train_data_digest', '?')}`)",
            f"- evaluation: [run `{evaluation.info.run_id}`]({run_link})",
            *report,
            f"- confusion matrix (row-normalised): [{figure}]({run_link}/artifacts/{figure})",
            "",
            f"![confusion matrix](get-artifact?path={figure}&run_uuid={evaluation.info.run_id})",
        ])

    def _source_uri(self) -> str:
        """The served model's URI as the registry records it: a training run's ``runs:/<id>/model``
        by that run's logged model (``models:/m-...``, its ``fer.model_uri`` tag), the source MLflow
        would look up itself, with a warning on every promote."""
        served = self.best.evaluation.data.tags[SERVED_MODEL_URI_TAG]
        source_run, _ = self.best.key
        if served != f"runs:/{source_run}/model":
            return served
        logged = retrying(self.client.get_run, source_run).data.tags.get(MODEL_URI_TAG, "")
        return logged if logged.startswith("models:/m-") else served

    def _message(self, old, champion, scores, changed) -> str:
        score = scores[_key(champion)]
        where = f"on {self.split} data {self.digest}"
        if not changed:
            if old is not None and _key(old) == self.best.key:
                return f"{self.name} v{champion.version} is already champion ({self.metric}={score:.4f})"
            return (f"kept champion {self.name} v{champion.version} ({self.metric}={score:.4f}); "
                    f"best candidate scores {self.best.score:.4f} {where}")
        versus = "no champion yet" if old is None else \
            f"v{old.version} scored {scores.get(_key(old), float('nan')):.4f}"
        return (f"champion is now {self.name} v{champion.version} ({self.metric}={score:.4f} {where}; "
                f"previous: {versus})")


def _rollback(client, name, active) -> tuple[str, str]:
    with restoring(client, name, (CHAMPION, PREVIOUS)) as writer:
        return _rolled_back(client, name, active, writer)


def _rolled_back(client, name, active, writer: AliasWriter) -> tuple[str, str]:
    champion, previous = alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)
    if previous is None:
        raise ConfigError(f"{name} has no '{PREVIOUS}' alias to roll back to")
    writer.set(CHAMPION, previous.version)
    writer.delete(PREVIOUS)
    if champion is not None and champion.version != previous.version:
        user = active.data.tags.get("mlflow.user") or getpass.getuser()
        for key, value in {"rejected": "true", "rejected_by": user,
                           "rejected_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "rejected_in_run": active.info.run_id}.items():
            retrying(client.set_model_version_tag, name, champion.version, key, value)
    return previous.version, (f"rolled back: champion is {name} v{previous.version} again; "
                              f"v{champion.version if champion else '?'} is tagged rejected")


def _key(version: ModelVersion) -> tuple[str, str]:
    """The served model a version is: its training run and its predict settings."""
    return version.tags.get("source_run") or version.run_id, version.tags.get("settings") or PLAIN


def _versions(client, name, key: tuple[str, str] | None = None) -> list[ModelVersion]:
    """The versions of `name` (those of served model `key` only, if given), lowest number first."""
    return [v for v in versions(client, name) if key is None or _key(v) == key]
