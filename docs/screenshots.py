"""Take real screenshots of the MLflow 3.17 UI for the README.

The README shows what a reviewer sees in MLflow, so its pictures come from the real UI. This
script starts a throwaway ``mlflow server`` on loopback over an existing tracking store, finds
the experiment, a training run (a cnn if any) and the registered model's ``champion`` version
with ``MlflowClient``, and drives headless Debian Chromium with Playwright to save:

  runs.png            the experiment's runs table (nested runs expanded, key metric columns)
  run_metrics.png     the training run's "Model metrics" tab (its per-epoch charts)
  compare_charts.png  the experiment's chart view comparing the training runs
  model_version.png   the champion version's page (its description shows the confusion matrix)

With ``--sweep``, instead, of the experiment's newest sweep (its parent run and trials):

  sweep_runs.png      the runs table, the sweep's parent expanded over its trials, with the searched
                      params, each trial's state and best_val_accuracy as columns
  sweep_parallel.png  the trials compared (Compare): the parallel-coordinates plot of the searched
                      params against best_val_accuracy

Needs ``apt-get install chromium`` and ``pip install playwright`` (never ``playwright install``:
Debian's Chromium is used)::

  python docs/screenshots.py --tracking-uri sqlite:///path/mlflow.db \\
      --experiment fer-demo --model fer-emotion-demo --out docs/

The server runs in the store's folder (``--cwd``), so artifacts logged under a relative path
load as logged. Chromium's flags stop it calling Google, which stalls it on a closed network.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from mlflow import MlflowClient
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHARTS = "^(val_)?(accuracy|loss)$|learning_rate"  # regex typed into "Search metric charts"
COLUMNS = ["attributes.`Models`", "tags.`fer.stage`", "metrics.`test_accuracy`", "metrics.`test_f1_macro`",
           "metrics.`best_val_accuracy`", "metrics.`train_seconds`"]


def start_server(tracking_uri: str, cwd: str, log) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on a free loopback port in its own process group; wait for /health."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", tracking_uri],
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})  # no calls home from the server
    base, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return server, base
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"mlflow server did not answer {base}/health; see {log.name}")


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server and the uvicorn and job-runner processes it spawned (its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL only reaches what outlived SIGTERM
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def find_targets(client: MlflowClient, experiment: str, model: str):
    """Return the experiment, its runs, one training run and the champion model version."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment named {experiment!r}")
    version = client.get_model_version_by_alias(model, "champion")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    train = [r for r in runs if r.data.tags.get("fer.stage") == "train"]
    if not train:
        raise SystemExit(f"experiment {experiment!r} has no run tagged fer.stage=train")
    # the newest cnn run, the champion's own first; else the newest training run
    best = max(train, key=lambda r: (r.data.tags.get("fer.model") == "cnn", r.info.run_id == version.run_id))
    return exp, runs, best, version


def ui_state(exp, runs) -> str:
    """JavaScript that seeds the UI's localStorage before each page loads.

    It stops the assistant panel opening on a first visit, picks the "Model training" sidebar,
    gives the runs table its metric columns with every parent run expanded, and shows only the
    training runs in the chart view (MLflow 3.17 mislabels a line chart's legend when runs
    without that metric are shown too).
    """
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.data.tags}
    others = [r.info.run_id for r in runs if r.data.tags.get("fer.stage") != "train"]
    table = {"selectedColumns": COLUMNS, "runsExpanded": dict.fromkeys(parents, True),
             "runsVisibilityMap": dict.fromkeys(others, False), "runsHiddenMode": "CUSTOM"}
    items = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
             "mlflow.workflowType_v1": json.dumps("machine_learning"),
             f'MLflowLocalStorage-1.1-ExperimentPage-["{exp.experiment_id}"]-ReactComponentState': json.dumps(table)}
    return "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in items.items())


def shoot(page, url: str, path: Path, wait_text: str, charts: str = "") -> None:
    """Open ``url``, wait for ``wait_text`` (and the ``charts`` searched for), save a PNG."""
    page.goto(url)
    page.get_by_text(wait_text).first.wait_for(timeout=60_000)
    if charts:
        page.get_by_placeholder("Search metric charts").fill(charts)
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    # no wait for "networkidle": the UI's telemetry web worker never counts as loaded
    page.wait_for_function("[...document.images].every(img => img.complete)")
    page.wait_for_timeout(3_000)  # let the last requests land and the charts finish drawing
    page.screenshot(path=str(path))
    print(path)


def take_screenshots(base: str, exp, runs, train, version, out: Path, size: str) -> None:
    """Drive headless Chromium, with a fresh profile, over the four pages; write PNGs to ``out``."""
    width, height = (int(n) for n in size.split("x"))
    ui = f"{base}/#/experiments/{exp.experiment_id}/runs"
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS, viewport={"width": width, "height": height})
        browser.add_init_script(ui_state(exp, runs))
        page = browser.new_page()
        shoot(page, ui, out / "runs.png", train.info.run_name)
        shoot(page, f"{ui}/{train.info.run_id}/model-metrics", out / "run_metrics.png", "Model metrics", CHARTS)
        shoot(page, f"{ui}?compareRunsMode=CHART", out / "compare_charts.png", "matching runs", CHARTS)
        shoot(page, f"{base}/#/models/{version.name}/versions/{version.version}", out / "model_version.png",
              f"Version {version.version}")
        browser.close()


def sweep_state(exp, parent, searched: list[str]) -> str:
    """localStorage for the sweep's runs table: its parent expanded, trial columns."""
    columns = ["tags.`fer.trial`", "tags.`fer.trial_state`", "metrics.`best_val_accuracy`",
               "metrics.`epochs_trained`", *(f"params.`{name}`" for name in searched)]
    table = {"selectedColumns": columns, "runsExpanded": {parent.info.run_id: True}}
    items = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
             "mlflow.workflowType_v1": json.dumps("machine_learning"),
             f'MLflowLocalStorage-1.1-ExperimentPage-["{exp.experiment_id}"]-ReactComponentState': json.dumps(table)}
    script = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in items.items())
    return script


def sweep_screenshots(base: str, client: MlflowClient, experiment: str, out: Path, size: str) -> None:
    """The newest sweep of `experiment`: its runs table and its trials' parallel coordinates."""
    exp = client.get_experiment_by_name(experiment)
    sweeps = client.search_runs([exp.experiment_id], "tags.`fer.stage` = 'sweep' and tags.`fer.sweep_worker` = '0'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        raise SystemExit(f"experiment {experiment!r} has no sweep")
    parent = sweeps[0]
    trials = client.search_runs([exp.experiment_id], f"tags.`fer.study` = '{parent.data.tags['fer.study']}' "
                                                     "and tags.`fer.stage` = 'train'")
    with tempfile.TemporaryDirectory() as folder:
        space = Path(client.download_artifacts(parent.info.run_id, "space.yaml", folder)).read_text()
    searched = list(yaml.safe_load(space))
    width, height = (int(n) for n in size.split("x"))
    ui = f"{base}/#/experiments/{exp.experiment_id}/runs"
    finished = [r.info.run_id for r in trials if r.info.status == "FINISHED"]
    compare = f"{base}/#/compare-runs?runs={json.dumps(finished)}&experiments={json.dumps([exp.experiment_id])}"
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS, viewport={"width": width, "height": height})
        browser.add_init_script(sweep_state(exp, parent, searched))
        page = browser.new_page()
        shoot(page, ui, out / "sweep_runs.png", parent.info.run_name)
        page.goto(compare)
        page.get_by_text("Parallel Coordinates Plot").first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Clear All").click()
        boxes = page.get_by_role("combobox")
        for box, names in ((boxes.nth(0), searched), (boxes.nth(1), ["best_val_accuracy"])):
            for name in names:
                box.click()
                box.fill(name)
                page.keyboard.press("Enter")
            page.keyboard.press("Escape")
        page.wait_for_timeout(3_000)
        page.screenshot(path=str(out / "sweep_parallel.png"))
        print(out / "sweep_parallel.png")
        browser.close()


def main(argv=None) -> None:
    """Parse the arguments, start the server, take the screenshots, always stop the server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:///path/mlflow.db")
    parser.add_argument("--experiment", required=True, help="experiment name")
    parser.add_argument("--model", help="registered model with a 'champion' alias")
    parser.add_argument("--sweep", action="store_true", help="the newest sweep's runs table and parallel coordinates")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNGs")
    parser.add_argument("--cwd", help="folder to run the server in (default: the sqlite file's)")
    parser.add_argument("--size", default="1600x1000", help="browser viewport, WIDTHxHEIGHT")
    args = parser.parse_args(argv)

    uri, cwd = args.tracking_uri, args.cwd or os.getcwd()
    if uri.startswith("sqlite:///"):  # made absolute, so the server finds it from any folder
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        uri, cwd = f"sqlite:///{db}", args.cwd or str(db.parent)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.sweep:
        if not args.model:
            parser.error("--model is needed (or --sweep)")
        exp, runs, train, version = find_targets(MlflowClient(uri), args.experiment, args.model)
    with tempfile.NamedTemporaryFile("w", prefix="mlflow-server-", suffix=".log", delete=False) as log:
        server, base = start_server(uri, cwd, log)
        try:
            if args.sweep:
                sweep_screenshots(base, MlflowClient(uri), args.experiment, args.out, args.size)
            else:
                take_screenshots(base, exp, runs, train, version, args.out, args.size)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
