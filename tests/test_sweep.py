"""The sweep entry point: an Optuna search over train's parameters, a nested train run per trial."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import uuid

import click
import keras
import mlflow
import optuna
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from conftest import PROJECT, all_runs, mlflow_run
from fer_mlflow.learning import models, search_space, studies
from fer_mlflow.stages import promote, sweep, train
from fer_mlflow.cli import check_train_value, main as cli_main, train_options
from fer_mlflow.errors import ConfigError


@pytest.mark.parametrize("model", models.MODEL_NAMES)
def test_the_default_space_holds_the_default_recipe(model):
    """So a new study's first trial (the baseline) is the default recipe, within the space."""
    base = train.TrainConfig(model=model, weights="imagenet").resolved()
    space = search_space.default_space(model, base.optimizer, base.weights)
    searched = search_space.distributions(space, check_train_value)
    assert {"learning_rate", "weight_decay", "dropout", "erase", "label_smoothing", "batch_size"} <= set(space)
    assert ("widths" in space) == (model == "cnn")
    assert set(search_space.FINE_TUNING) <= set(space) if model.startswith("resnet") else not set(search_space.FINE_TUNING) & set(space)
    for name, distribution in searched.items():
        default = getattr(base, name)
        assert search_space.holds(distribution, ",".join(map(str, default)) if name == "widths" else default), name
    if model.startswith("resnet"):  # from scratch there is no fine-tuning phase to search
        assert not set(search_space.FINE_TUNING) & set(search_space.default_space(model, "adamw", "none"))


def test_a_space_file_is_checked_like_train_options(tmp_path):
    good = tmp_path / "space.yaml"
    good.write_text("learning_rate: {low: 0.01, high: 0.1, log: true}\nbatch_size: {choices: [32, 64]}\n"
                    "fine_tune_layers: {low: 10, high: 40, step: 10}\nwidths: {choices: ['16,32', '8,16,32']}\n")
    searched = search_space.distributions(search_space.load_space(str(good), check_train_value), check_train_value)
    assert isinstance(searched["learning_rate"], optuna.distributions.FloatDistribution) and searched["learning_rate"].log
    assert isinstance(searched["fine_tune_layers"], optuna.distributions.IntDistribution)
    assert searched["widths"].choices == ("16,32", "8,16,32")
    for text, says in [("dropout: {low: 0.1, high: 1.5}", "dropout"),
                       ("seed: {low: 0, high: 9}", "seed is not a train parameter a sweep searches"),
                       ("learning_rate: [0.1, 0.2]", "needs {low"),
                       ("erase: {low: 0.5, high: 0.1}", "not a valid range"),
                       ("learning_rate: {low: .nan, high: 0.1}", "low and high must be finite"),
                       ("learning_rate: {low: 0.01, high: .inf}", "low and high must be finite"),
                       ("widths: {choices: ['16,x']}", "widths"),
                       ("erase: {low: 0, hgh: 0.1}", "needs {low"),
                       ("learning_rate: {low: 0.1", "not valid YAML"),
                       ("- 1", "must map train parameters")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=says.replace("{", r"\{").replace("[", r"\[")):
            search_space.load_space(str(bad), check_train_value)
    with pytest.raises(ConfigError, match="cannot be read"):
        search_space.load_space(str(tmp_path / "missing.yaml"), check_train_value)


def test_bad_sweep_input_is_one_line_and_leaves_no_run(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dropout: {low: 0.1, high: 1.5}")
    for args, says in [(["--space", str(bad)], "space: dropout"),
                       (["--learning-rate", "-1"], "learning-rate"),
                       (["--no-such-option", "1"], "No such option"),
                       (["--storage", "mysql://x@localhost/db"], "storage mysql://x@localhost/db: use postgresql"),
                       (["--storage", str(tmp_path / "missing" / "study.journal")], "does not exist"),
                       (["--learning-rate", "0.1", "--space", str(_space(tmp_path, "learning_rate"))],
                        "nothing left to search"),
                       (["--time-budget", "1", "--trial-time-budget", "5"], "no trial could start"),
                       (["--resume", "abc"], "a sweep does not resume its trials")]:
        with pytest.raises(SystemExit) as stopped:
            cli_main(["sweep", "--trials", "1", *args])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and says in error, error
    assert all_runs() == []



def test_a_study_run_with_another_recipe_or_space_is_not_joined(tmp_path, capsys):
    """Going on with a study (its --storage and --study) is refused before any run when the model or
    fixed options differ from those it was run with, or a parameter's kind of range changed."""
    from fer_mlflow.learning import studies

    journal = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s1", storage=studies.open_storage(journal), direction="maximize")
    study.set_user_attr("recipe", {"model": "cnn", "fixed": "none"})
    study.add_trial(optuna.trial.create_trial(
        params={"learning_rate": 0.05}, value=0.5,
        distributions={"learning_rate": optuna.distributions.FloatDistribution(0.01, 0.1, log=True)}))
    choices = tmp_path / "choices.yaml"
    choices.write_text("learning_rate: {choices: [0.01, 0.1]}\n")
    for args, says in [(["--model", "cnn_shallow"], "study s1 was run with another recipe (model=cnn there, "
                                                    "cnn_shallow here)"),
                       (["--seed", "1"], "fixed=none there, seed=1 here"),
                       (["--space", str(choices)], "study s1 searched learning_rate over another kind of range")]:
        with pytest.raises(SystemExit) as stopped:
            cli_main(["sweep", "--trials", "1", "--storage", journal, "--study", "s1", *args])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and says in error, error
    assert all_runs() == []

def test_a_study_run_on_other_data_is_not_joined(tmp_path, tiny_npz, capsys):
    """A study keeps the digest of the data its trials trained on; going on with it on other data is
    refused in one line before any trial: a dataset artifact before any run, a raw source once cleaned
    in the sweep's run, which then ends FAILED, not RUNNING."""
    from fer_mlflow.learning import studies

    journal = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="s2", storage=studies.open_storage(journal), direction="maximize")
    study.set_user_attr("recipe", {"model": "cnn", "fixed": "epochs=1"})
    study.set_user_attr("data_digest", "0123456789abcdef")
    for data in (tiny_npz, "demo"):
        with pytest.raises(SystemExit) as stopped:
            cli_main(["sweep", "--trials", "1", "--storage", journal, "--study", "s2", "--data", data, "--epochs", "1"])
        assert stopped.value.code != 0
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        assert "study s2's trials trained on data 0123456789abcdef" in error and "name a new --study" in error
        sweeps = [run.info.status for run in all_runs("tags.`fer.stage` = 'sweep'")]
        assert sweeps == ([] if data == tiny_npz else ["FAILED"])  # the artifact is refused before any run
    assert len(optuna.load_study(study_name="s2", storage=studies.open_storage(journal)).trials) == 0


def _space(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"{name}: {{low: 0.01, high: 0.1}}\n")
    return path


def test_train_options_pass_through_as_mlflow_run_hands_them_over():
    assert train_options(["--learning_rate", "0.1", "--widths", "16,32", "--flip", "false"]) == \
        {"learning_rate": 0.1, "widths": (16, 32), "flip": False}
    with pytest.raises(click.UsageError, match="passes the options of train through"):
        train_options(["--erase", "2"])


def test_the_pruner_stops_a_trial_below_the_median_at_the_same_epoch():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1))
    done = study.ask()
    for epoch, value in enumerate([0.3, 0.5, 0.6]):
        done.report(value, epoch)
    study.tell(done, 0.6)
    report = sweep._Report(study.ask())
    report.set_model(keras.Sequential())
    report.model.stop_training = False  # as fit sets it
    report.on_epoch_end(0, {"val_accuracy": 0.1})  # epoch 0 is the warm-up: never pruned
    report.on_epoch_end(1, {"val_accuracy": 0.55})  # above the median (0.5): goes on
    assert not report.model.stop_training
    # Its best so far (0.55) is compared with the median at the same epoch (0.6): the fit is told
    # to stop after this epoch, and the trial ends pruned once it has.
    report.on_epoch_end(2, {"val_accuracy": 0.4})
    assert report.model.stop_training
    with pytest.raises(sweep.Pruned, match="pruned after 3 epochs: val_accuracy 0.4000"):
        report.on_train_end()


class _Sabotage(keras.callbacks.Callback):
    """Makes one trial fail mid-training, and another look hopeless to the pruner."""

    def __init__(self, trial: str):
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch, logs=None):
        if self.trial == "1":
            raise RuntimeError("out of memory (a test's failure)")
        if self.trial == "3":
            logs["val_accuracy"] = 0.0


@pytest.mark.slow
def test_a_sweep_logs_a_parent_with_its_trials_and_goes_on_past_a_failed_one(tiny_npz, monkeypatch):
    real_run = train.run

    def run(config, nested=False, tags=None, callbacks=()):
        return real_run(config, nested, tags, (_Sabotage(tags["fer.trial"]), *callbacks))

    monkeypatch.setattr(train, "run", run)
    monkeypatch.setattr(sweep, "PRUNER_STARTUP_TRIALS", 2)  # so trials 0 and 2 finish, 3 may be pruned
    config = sweep.SweepConfig(data=tiny_npz, trials=4, prune_warmup=0)
    outcome = sweep.run(config, {"epochs": 2, "erase": 0.25}, ("--epochs", "2", "--erase", "0.25"),
                        check=check_train_value)

    client = MlflowClient()
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["fer.stage"] == "sweep"
    assert parent.data.params["fixed"] == "epochs=2 erase=0.25" and parent.data.params["trials"] == "4"
    searched = parent.data.params["search_space"]
    assert "erase" not in searched and "learning_rate" in searched
    assert parent.data.params["sampler"].startswith("TPESampler") and "MedianPruner" in parent.data.params["pruner"]
    trials = sorted(all_runs(f"tags.`mlflow.parentRunId` = '{outcome.run_id}' and tags.`fer.stage` = 'train'"),
                    key=lambda r: int(r.data.tags["fer.trial"]))
    assert [(r.data.tags["fer.trial"], r.info.status, r.data.tags["fer.trial_state"]) for r in trials] == [
        ("0", "FINISHED", "complete"), ("1", "FAILED", "failed"), ("2", "FINISHED", "complete"),
        ("3", "KILLED", "pruned")]
    assert all(r.data.params["erase"] == "0.25" and r.data.params["epochs"] == "2" for r in trials)
    baseline = trials[0].data.params  # the default recipe first
    assert (baseline["learning_rate"], baseline["weight_decay"], baseline["batch_size"], baseline["widths"]) == \
        ("0.05", "0.005", "64", "20,40,80,160")
    assert [a.path for a in client.list_artifacts(trials[3].info.run_id) if a.path == "model"] == []
    metrics = parent.data.metrics
    assert (metrics["trials_complete"], metrics["trials_pruned"], metrics["trials_failed"]) == (2, 1, 1)
    best = max((r for r in trials if r.info.status == "FINISHED"), key=lambda r: r.data.metrics["best_val_accuracy"])
    assert metrics["best_value"] == pytest.approx(best.data.metrics["best_val_accuracy"])
    assert parent.data.tags["fer.best_run"] == best.info.run_id == outcome.best_run_id

    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/trials.csv")))
    assert list(table["state"]) == ["COMPLETE", "FAIL", "COMPLETE", "PRUNED"]
    assert list(table["user_attrs_run_id"]) == [r.info.run_id for r in trials]
    assert "params_learning_rate" in table and "params_erase" not in table
    figures = {a.path for a in client.list_artifacts(outcome.run_id, "figures")}
    assert figures == {f"figures/{name}.png" for name in sweep.FIGURES}
    evaluation = client.get_run(outcome.evaluation_run_id)
    assert evaluation.data.tags["mlflow.parentRunId"] == outcome.run_id
    assert evaluation.data.tags["fer.source_run"] == best.info.run_id
    assert metrics["best_test_accuracy"] == evaluation.data.metrics["test_accuracy"]
    promoted = promote.run()  # ready for promote: the best trial's model becomes the champion
    champion = client.get_model_version_by_alias(promoted.registered_model_name, "champion")
    assert champion.run_id == best.info.run_id


@pytest.mark.slow
def test_no_trial_starts_that_the_sweep_budget_cannot_finish(tiny_npz):
    """A 0.3-minute sweep of 0.2-minute trials runs one; without a per-trial budget, the sweep's
    remaining time becomes the trial's."""
    first = sweep.run(sweep.SweepConfig(data=tiny_npz, trials=5, time_budget=0.3, trial_time_budget=0.2,
                                        evaluate=False), check=check_train_value)
    assert sum(first.counts.values()) == 1
    # no early stop: only the time budget ends the trial, so no time is left for another
    second = sweep.run(sweep.SweepConfig(data=tiny_npz, trials=5, time_budget=0.3, evaluate=False),
                       {"epochs": 1000, "patience": 1000}, check=check_train_value)
    trials = all_runs(f"tags.`mlflow.parentRunId` = '{second.run_id}' and tags.`fer.stage` = 'train'")
    assert len(trials) == 1
    budget = float(trials[0].data.params["time_budget"])
    assert 0 < budget <= 0.3
    # Training ends within a step of its budget (checked after each step); not the sweep's wall-clock
    # time, which adds logging the model and, on a loaded machine, was 54 s of a 0.3-minute sweep.
    assert trials[0].data.metrics["train_seconds"] < budget * 60 + 10


def _worker(data: str, storage: str, tracking: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fer_mlflow", "sweep", "--data", data, "--storage", storage, "--study", "shared",
         "--trials", "4", "--evaluate", "false", "--epochs", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking}, cwd=PROJECT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _check_one_study(tracking: str, storage, workers: int, trials: int) -> None:
    """`trials` trials, each run once, each run FINISHED (KILLED if pruned), a parent per worker."""
    study = optuna.load_study(study_name="shared",
                              storage=studies.open_storage(storage) if isinstance(storage, str) else storage)
    numbers = sorted(t.number for t in study.trials)
    assert numbers == list(range(trials))
    unfinished = {t.number: (t.state.name, t.user_attrs.get("error")) for t in study.trials
                  if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)}
    assert not unfinished, unfinished
    mlflow.set_tracking_uri(tracking)
    runs = all_runs("tags.`fer.study` = 'shared'")
    parents = [r for r in runs if r.data.tags["fer.stage"] == "sweep"]
    assert len(parents) == workers and all(r.info.status == "FINISHED" for r in parents)
    trained = [r for r in runs if r.data.tags["fer.stage"] == "train"]
    assert sorted(int(r.data.tags["fer.trial"]) for r in trained) == numbers  # no trial run twice
    assert {r.data.tags["mlflow.parentRunId"] for r in trained} <= {r.info.run_id for r in parents}
    for run in trained:
        assert (run.info.status, run.data.tags["fer.trial_state"]) in (("FINISHED", "complete"), ("KILLED", "pruned"))
    by_number = {t.number: t.user_attrs["run_id"] for t in study.trials}
    assert by_number == {int(r.data.tags["fer.trial"]): r.info.run_id for r in trained}


@pytest.mark.slow
def test_two_workers_started_together_share_one_study_without_running_a_trial_twice(tiny_npz, tmp_path, tracking):
    journal = str(tmp_path / "study.journal")
    mlflow.search_experiments()  # creates the store's tables: two processes doing it at once collide
    workers = [_worker(tiny_npz, journal, tracking) for _ in range(2)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    _check_one_study(tracking, storage, workers=2, trials=4)


SECRET = "s3cret-Pa55"  # a password for the tests below; it must turn up nowhere


def test_a_password_in_a_parameter_is_refused_and_the_run_that_logged_it_deleted(tmp_path, monkeypatch, capsys):
    """As `mlflow run -P storage=postgresql://optuna:PASSWORD@...` hands it over: the run mlflow run
    opened has logged the URL as a param already; the command refuses it in one line that says where
    the password goes, ends that run and deletes it, so no search of the project's finds it."""
    url = f"postgresql+psycopg2://optuna:{SECRET}@127.0.0.1:9/optuna"
    client = MlflowClient()
    opened = client.create_run(client.create_experiment("projects"), tags={"mlflow.source.type": "PROJECT"})
    client.log_param(opened.info.run_id, "storage", url)
    kept = client.create_run(opened.info.experiment_id)  # a run of the user's that never saw the password
    query = url.replace(f"optuna:{SECRET}@", "optuna@") + f"?password={SECRET}"
    for args, run in [(["--storage", query], kept), ([f"--storage={url}"], kept), (["--storage", url], opened)]:
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        with pytest.raises(SystemExit) as stopped:
            cli_main(["sweep", "--trials", "1", *args])
        assert stopped.value.code == 2
        printed = capsys.readouterr()
        assert SECRET not in printed.out + printed.err
        errors = [line for line in printed.err.splitlines() if " INFO mlflow" not in line]  # MLflow's store log
        assert len(errors) == 1 and "carries a password" in errors[0] and "PGPASSWORD" in errors[0], errors
        assert (f"mlflow gc --run-ids {run.info.run_id}" in errors[0]) == (run is opened), errors
    assert client.get_run(kept.info.run_id).info.lifecycle_stage == "active"  # it never logged the password
    deleted = client.get_run(opened.info.run_id)
    assert (deleted.info.lifecycle_stage, deleted.info.status) == ("deleted", "FAILED")
    assert not [r for r in all_runs() if any(SECRET in v for v in r.data.params.values())]
    monkeypatch.delenv("MLFLOW_RUN_ID")
    with pytest.raises(ConfigError, match="carries a password") as refused:  # the Python API refuses it too
        sweep.run(sweep.SweepConfig(storage=url, trials=1), check=check_train_value)
    assert SECRET not in str(refused.value)
    assert [r.info.run_id for r in all_runs()] == [kept.info.run_id]


@pytest.mark.slow
def test_every_worker_of_a_sweep_shares_its_one_deadline(tiny_npz, tmp_path):
    """A worker started by `workers=2` takes a while to start (Python, TensorFlow, the data): that time
    counts against the sweep's budget, so no trial of any worker is given time past the launcher's
    deadline. Each trial is asked for under the study lock and given the minutes left then."""
    budget = 0.75  # minutes: long enough for the second worker to start and take a trial
    journal = str(tmp_path / "study.journal")
    outcome = sweep.run(sweep.SweepConfig(data=tiny_npz, trials=2, workers=2, storage=journal, study="shared",
                                          time_budget=budget, evaluate=False),
                        {"epochs": 1000, "patience": 1000}, ("--epochs", "1000", "--patience", "1000"),
                        check=check_train_value)
    launcher = MlflowClient().get_run(outcome.run_id)
    ends_by = launcher.info.start_time / 1000 + budget * 60  # the deadline is set just before this run starts
    trained = {int(r.data.tags["fer.trial"]): r for r in all_runs("tags.`fer.stage` = 'train'")}
    study = optuna.load_study(study_name="shared", storage=studies.open_storage(journal))
    assert study.trials and set(trained) == {t.number for t in study.trials}
    for trial in study.trials:
        minutes = float(trained[trial.number].data.params["time_budget"])
        late = trial.datetime_start.timestamp() + minutes * 60 - ends_by
        assert late <= 0.5, f"trial {trial.number} of worker {trained[trial.number].data.tags['mlflow.parentRunId']} " \
                            f"may train {late:.1f} s past the sweep's deadline"
    parents = all_runs("tags.`fer.stage` = 'sweep'")
    assert len(parents) == 2 and {p.data.params["deadline"] for p in parents} == {launcher.data.params["deadline"]}


@pytest.mark.slow
def test_mlflow_run_with_a_password_in_storage_is_refused_and_its_run_deleted(tracking):
    """The README's old advice, `mlflow run . -e sweep -P storage=postgresql://optuna:PASSWORD@...`:
    mlflow run logs the value before the project's code runs; the command refuses it, and the run is
    left deleted (out of every search) rather than findable with the password in its params."""
    done = mlflow_run("sweep", {"storage": f"postgresql://optuna:{SECRET}@127.0.0.1:9/optuna", "trials": 1}, tracking)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "carries a password" in errors[0] and "PGPASSWORD" in errors[0], done.stderr[-3000:]
    assert SECRET not in errors[0]
    logged = all_runs(run_view_type=ViewType.ALL)
    assert [(r.info.lifecycle_stage, r.info.status) for r in logged] == [("deleted", "FAILED")]
    assert f"mlflow gc --run-ids {logged[0].info.run_id}" in errors[0]
    assert all_runs() == []


@pytest.fixture
def password_database(postgres_server):
    """A database owned by a role that must give its password (`SECRET`, scram-sha-256 on loopback;
    the other roles of the tests' server keep trust): its URL, without the password."""
    import psycopg2

    role = f"optuna_{uuid.uuid4().hex[:8]}"
    postgres_server.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'")
    postgres_server.execute(f"CREATE DATABASE {role} OWNER {role}")
    hba = postgres_server.folder / "data" / "pg_hba.conf"
    before = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + before)  # the first matching line wins
    postgres_server.execute("SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 30
        while True:  # until the reloaded rules ask the role for its password
            try:
                psycopg2.connect(host="127.0.0.1", port=postgres_server.port, user=role, dbname=role,
                                 password="").close()
            except psycopg2.OperationalError as refused:
                assert "password" in str(refused)
                break
            assert time.monotonic() < deadline, "PostgreSQL did not reload pg_hba.conf"
            time.sleep(0.2)
        yield f"postgresql://{role}@127.0.0.1:{postgres_server.port}/{role}"
    finally:
        hba.write_text(before)
        postgres_server.execute("SELECT pg_reload_conf()")


def _command_lines(root: psutil.Process, seen: list, done: threading.Event) -> None:
    """Sample the command line of `root` and every process under it until `done`."""
    while not done.is_set():
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                seen.append(process.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        time.sleep(0.1)


@pytest.mark.slow
def test_a_two_worker_sweep_on_a_team_server_takes_its_password_from_the_environment_and_shows_it_nowhere(
        tracking_server, postgres, password_database, tiny_npz, tmp_path, monkeypatch, capsys):
    """`workers=2` through `mlflow run` against a team's server (PostgreSQL behind it), as the README
    says to run it: the study in a PostgreSQL database of its own (Optuna and MLflow each keep an
    Alembic version table by the same name), its password in PGPASSWORD and the URL without it. The
    password turns up in no param, tag or artifact (every file under the test's folder, the server's
    artifacts included), no line the sweep prints, and no command line of it or its workers."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    mlflow.set_tracking_uri(tracking_server)
    with pytest.raises(SystemExit):  # `postgres` is the tracking server's own database
        cli_main(["sweep", "--storage", postgres.replace("+psycopg2", ""), "--data", tiny_npz])
    assert "give the study a database of its own" in capsys.readouterr().err

    command = [sys.executable, "-m", "mlflow", "run", str(PROJECT), "-e", "sweep", "--env-manager", "local"]
    for key, value in {"data": tiny_npz, "workers": 2, "storage": password_database, "study": "shared",
                       "trials": 3, "epochs": 1}.items():
        command += ["-P", f"{key}={value}"]
    process = subprocess.Popen(command, env={**os.environ, "PGPASSWORD": SECRET},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, done = [], threading.Event()
    sampler = threading.Thread(target=_command_lines, args=(psutil.Process(process.pid), seen, done))
    sampler.start()
    try:
        output = process.communicate(timeout=900)[0]
    finally:
        done.set()
        sampler.join()
    assert process.returncode == 0, output[-4000:]
    monkeypatch.setenv("PGPASSWORD", SECRET)  # to read the study back
    _check_one_study(tracking_server, password_database, workers=2, trials=3)
    parents = all_runs("tags.`fer.stage` = 'sweep'")
    launcher = next(r for r in parents if r.data.tags["fer.sweep_worker"] == "0")
    assert launcher.data.metrics["trials_complete"] + launcher.data.metrics["trials_pruned"] == 3
    evaluation = MlflowClient().get_run(launcher.data.tags["fer.best_evaluation"])
    assert evaluation.data.tags["fer.source_run"] == launcher.data.tags["fer.best_run"]

    assert SECRET not in output
    workers = [line for line in seen if "--worker-index" in line]
    assert workers and any("--storage" in line for line in workers)  # the started worker was seen
    assert not [line for line in seen if SECRET in " ".join(line)]
    runs = all_runs()
    assert {r.data.params["storage"] for r in parents} == {password_database}
    for run in runs:
        assert not [v for v in (*run.data.params.values(), *run.data.tags.values()) if SECRET in v], run.info.run_id
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "trials.csv" for path in files)  # the server's artifacts are among them
    assert not [path for path in files if SECRET.encode() in path.read_bytes()]


@pytest.mark.parametrize("url, carries", [
    ("postgresql+psycopg2://optuna:pw@db-host:5432/optuna", True),
    ("postgresql://optuna:1234@db-host/optuna", True),
    ("postgresql://optuna:pa/ss#1@db-host/optuna", True),  # unescaped: urlsplit alone misses it
    ("postgresql://optuna@db-host/optuna?sslmode=require&password=pw", True),
    ("postgresql://optuna@db-host:5432/optuna", False),
    ("http://mlflow-host:5000/models/fer@champion", False),  # a port, then an @ in the path
    ("sqlite:////tmp/study.db", False), ("/tmp/study.journal", False), ("models:/fer-emotion@champion", False),
])
def test_a_password_is_told_from_a_port(url, carries):
    from fer_mlflow.tracking import credentials

    assert credentials.carries_password(url) == carries
    shown = credentials.masked(url)
    assert (shown, "***" in shown) == (url, False) if not carries else \
        ("***" in shown and not any(secret in shown for secret in ("pw", "1234", "pa/ss")))


def test_two_runs_logging_one_dataset_at_the_same_moment_both_log_it():
    """Sweep workers log one dataset as each trial starts. MLflow's store looks the dataset up, then
    inserts it: two runs that both look before either inserts collide on the insert (SQLite: UNIQUE
    constraint failed). Here both lookups are held until both have been made; the loser's retry
    finds the winner's dataset, and each run has the dataset among its inputs."""
    from mlflow.tracking._tracking_service.utils import _get_store
    from sqlalchemy import event

    from fer_mlflow.data.demo import make_demo
    from fer_mlflow.tracking.runs import log_split_inputs

    dataset = make_demo(per_class=9)
    engine = _get_store().engine
    both_looked = threading.Barrier(2, timeout=30)
    waited = set()

    def hold_first_lookup(conn, cursor, statement, parameters, context, executemany):
        thread = threading.get_ident()
        if statement.lstrip().upper().startswith("SELECT") and "FROM datasets" in statement \
                and thread not in waited:
            waited.add(thread)
            both_looked.wait()

    runs = [mlflow.MlflowClient().create_run("0").info.run_id for _ in range(2)]
    results, errors = {}, []

    def log(run_id: str) -> None:
        try:
            with mlflow.start_run(run_id=run_id):
                results[run_id] = log_split_inputs(dataset, "demo", "demo", splits=("train",))
        except Exception as error:  # the test reports it below
            errors.append(error)

    event.listen(engine, "before_cursor_execute", hold_first_lookup)
    try:
        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        event.remove(engine, "before_cursor_execute", hold_first_lookup)
    assert not errors, errors
    assert len(waited) == 2  # both lookups were made before either insert
    digest = dataset.split("train").digest()
    for run_id in runs:
        assert results[run_id] == {"train": digest}
        inputs = mlflow.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("demo/train", digest)]
