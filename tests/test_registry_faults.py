"""Promote never guesses: a registry that fails, even after retries, makes promote fail in one line
and leaves every alias and version as it was. Faults are injected by a proxy on loopback in front of
a real `mlflow server`: answering 500 to chosen calls, or stopping the server mid-promote."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import keras
import mlflow
import pytest
from conftest import free_port, start_mlflow_server, stop_group
from mlflow import MlflowClient

from fer_mlflow.stages import promote
from fer_mlflow.cli import main
from fer_mlflow.serving.pyfunc_model import log_model
from fer_mlflow.tracking.runs import DATA_EXPERIMENT, experiment_id

MODEL = "fer-emotion"
SEARCH = ("GET", "/api/2.0/mlflow/model-versions/search")
ALIAS = ("POST", "/api/2.0/mlflow/registered-models/alias")
CREATE_VERSION = ("POST", "/api/2.0/mlflow/model-versions/create")


class FaultyProxy:
    """A loopback HTTP proxy to `target`. A request whose (method, path) and body `rule` picks is
    answered 500 (``"fail"``), or first stops the server behind it (``"stop"``, via `stop`); once
    stopped, every request's connection is closed unanswered, as a dead server's would be."""

    def __init__(self, target: str, rule, stop=None):
        self.target, self.rule, self.stop, self.stopped, self.seen = target, rule, stop, False, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_any(self):
                try:
                    self.answer()
                except OSError:  # the client gave up or the server is gone: drop the connection
                    self.close_connection = True

            def answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                proxy.seen.append((self.command, path))
                action = proxy.rule(self.command, path, body)
                if action == "stop" and not proxy.stopped:
                    proxy.stop()
                    proxy.stopped = True
                if proxy.stopped:
                    self.close_connection = True
                    return
                if action == "fail":
                    answer = json.dumps({"error_code": "INTERNAL_ERROR", "message": "fault injected"}).encode()
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                host, port = proxy.target.removeprefix("http://").split(":")
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = do_any

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(tmp_path):
    """A real `mlflow server` on loopback (SQLite store, artifacts through the server): (url, process)."""
    url, process = start_mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "server-artifacts")
    try:
        yield url, process
    finally:
        stop_group(process)


def use(uri: str, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)


@pytest.fixture
def registry_with_a_champion(server, tmp_path, monkeypatch):
    """Through the server: run `a` (test_accuracy 0.7) promoted to champion v1, then run `b`
    evaluated on the same data. Returns (url, process, {name: training run}, evaluation(name, score))."""
    url, process = server
    use(url, monkeypatch)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # only promote's own retries: fast
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    inputs = keras.Input((48, 48, 1))
    outputs = keras.layers.Dense(7, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    keras_model = keras.Model(inputs, outputs)
    experiment = experiment_id(DATA_EXPERIMENT)
    runs = {}
    for name in ("a", "b"):
        with mlflow.start_run(run_name=name, experiment_id=experiment) as run:
            mlflow.set_tags({"fer.stage": "train", "fer.model": "cnn", "fer.model_family": "cnn"})
            log_model(keras_model, name="model")
            runs[name] = run.info.run_id

    def evaluation(name: str, score: float) -> None:
        with mlflow.start_run(run_name=f"evaluate {name}", experiment_id=experiment):
            mlflow.set_tags({"fer.stage": "evaluate", "fer.source_run": runs[name], "fer.test_digest": "d1",
                             "fer.settings": "tta=false", "fer.served_model_uri": f"runs:/{runs[name]}/model"})
            mlflow.log_metric("test_accuracy", score)

    evaluation("a", 0.7)
    assert promote.run().changed
    return url, process, runs, evaluation


def registry_state(uri: str) -> list[tuple[str, str, list[str]]]:
    """(version, training run, its aliases) for each version of the model."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    aliases = client.get_registered_model(MODEL).aliases  # search_model_versions leaves aliases out
    return sorted((str(v.version), v.run_id, sorted(a for a, n in aliases.items() if str(n) == str(v.version)))
                  for v in client.search_model_versions(f"name = '{MODEL}'"))


def failed_promote(proxy: FaultyProxy, monkeypatch, capsys) -> str:
    """Run the promote command through `proxy`; returns its one error line."""
    use(proxy.url, monkeypatch)
    capsys.readouterr()
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        main(["promote"])
    assert stopped.value.code == 2 and time.monotonic() - started < 60
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    return line


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["versions_unreadable", "champion_write_fails"])
def test_a_registry_answering_500_fails_promote_in_one_line_and_changes_nothing(
        fault, registry_with_a_champion, monkeypatch, capsys):
    url, _, runs, evaluation = registry_with_a_champion
    def rule(method, path, body):
        if fault == "versions_unreadable":  # read as "no versions": b, worse, would be registered and champion
            return "fail" if (method, path) == SEARCH else None
        return "fail" if (method, path) == ALIAS and b'"champion"' in body else None  # after previous is set

    evaluation("b", 0.5 if fault == "versions_unreadable" else 0.9)
    before = registry_state(url)
    proxy = FaultyProxy(url, rule)
    try:
        line = failed_promote(proxy, monkeypatch, capsys)
    finally:
        proxy.close()
        use(url, monkeypatch)
    assert "registry" in line and "too many 500 error responses" in line
    assert ("moved no alias" if fault == "versions_unreadable" else "as they were (champion v1, no previous)") in line
    assert before == [("1", runs["a"], ["champion"])]
    after = registry_state(url)
    assert [v for v in after if v[2]] == before  # every alias as it was
    assert [v[1] for v in after] in ([runs["a"]], [runs["a"], runs["b"]])  # b registered at most once
    promotes = MlflowClient().search_runs(
        [experiment_id(DATA_EXPERIMENT)], "tags.`fer.stage` = 'promote'", order_by=["attributes.start_time DESC"])
    assert promotes[0].info.status == "FAILED"
    # The registry answers again: promote decides as if nothing had failed.
    again = promote.run()
    expected = runs["a"] if fault == "versions_unreadable" else runs["b"]
    assert again.changed == (expected == runs["b"])
    assert MlflowClient().get_model_version_by_alias(MODEL, "champion").run_id == expected
    assert len({v[1] for v in registry_state(url)}) == len(registry_state(url))  # no duplicate


@pytest.mark.slow
def test_the_server_stopped_mid_promote_fails_it_in_one_line_and_leaves_the_registry_as_it_was(
        registry_with_a_champion, tmp_path, monkeypatch, capsys):
    url, process, runs, evaluation = registry_with_a_champion
    evaluation("b", 0.9)  # better: promote registers it, then moves the aliases
    before = registry_state(url)
    def crash():  # at once, as a crash or a lost machine: a graceful stop may outlast the client's timeout
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    proxy = FaultyProxy(url, lambda method, path, body: "stop" if (method, path) == CREATE_VERSION else None,
                        stop=crash)
    try:
        line = failed_promote(proxy, monkeypatch, capsys)
    finally:
        proxy.close()
    assert proxy.stopped and "registry" in line
    store = f"sqlite:///{tmp_path}/server.db"  # the server is gone: read its store directly
    assert registry_state(store) == before == [("1", runs["a"], ["champion"])]
