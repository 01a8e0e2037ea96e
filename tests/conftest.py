"""Shared fixtures: a temporary MLflow tracking store per test, and tiny FER2013-like sources."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from fer_mlflow.data.dataset import CLASS_NAMES

PROJECT = Path(__file__).resolve().parents[1]
SHARED_ZIP = PROJECT.parent / "shared" / "data" / "fer2013-public.zip"
# Set by .ci/run: there a service the tests need (PostgreSQL, Java) must be installed, so a missing
# one fails its tests instead of skipping them.
REQUIRE_SERVICES = "FER_REQUIRE_SERVICES"


def missing_service(message: str) -> None:
    """Skip the calling test, saying `message` (what is not installed and how to install it); fail it
    instead where FER_REQUIRE_SERVICES=1, as in CI, so no test is silently left out there."""
    if os.environ.get(REQUIRE_SERVICES) == "1":
        pytest.fail(f"{message} ({REQUIRE_SERVICES}=1: required)")
    pytest.skip(message)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """On two processes (pytest-xdist's ``-n 2 --dist loadgroup``, the README's command) each test
    file runs in one process, as ``--dist loadfile`` would have it, except the tests marked
    ``resnet``, which all run in one process: each lifts its process by 6-7 GB, and two at once would
    need more memory than a 24 GB machine has. In one process the groups change nothing."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group("resnet" if item.get_closest_marker("resnet") else item.path.name))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A tracking store with MLflow's tables made and nothing in it. Copied, it is a new store in a
    tenth of a second, where MLflow's migrations take about two seconds a store on these CPUs."""
    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def tracking(tmp_path, monkeypatch, empty_store):
    """Every test gets its own sqlite tracking store and runs in its own working directory."""
    import shutil
    import sqlite3
    from contextlib import closing

    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    with closing(sqlite3.connect(tmp_path / "mlflow.db")) as store, store:
        # Where a store made here would keep Default's artifacts: ./mlruns of the test's folder.
        store.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                      (str(tmp_path / "mlruns" / "0"),))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for chosen in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(chosen, raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    # An experiment set in this process (`mlflow.set_experiment`, as tools/make_pretrained.py does) is
    # an id of the previous test's store: each test starts with none.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set_experiment sets it too, for subprocesses


def all_runs(filter_string: str = "", **kwargs) -> list:
    """The runs of every experiment of the test's store (stages pick fer-demo or fer2013 themselves)."""
    return mlflow.search_runs(search_all_experiments=True, filter_string=filter_string,
                              output_format="list", **kwargs)


def refused(argv: list[str], capsys) -> str:
    """Run the CLI on options it must refuse: exit 2, one line on stderr, no run logged. The line."""
    from fer_mlflow.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not all_runs(), "a refused command logs no run"
    return lines[0]


def face(label: int, index: int) -> np.ndarray:
    """A distinct 48x48 uint8 image per (label, index), with contrast and a mid-range mean."""
    rng = np.random.default_rng(1000 * label + index)
    return rng.integers(40, 215, size=(48, 48), dtype=np.uint8)


def write_layout(root: Path, splits: dict[str, int], folder_case=str.lower) -> Path:
    """Write `<root>/<split>/<class>/<n>.png` (or `<root>/<class>/` for split ''), n images per class."""
    for split, per_class in splits.items():
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / folder_case(name) if split else root / folder_case(name)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                offset = {"train": 0, "test": 500, "": 900}.get(split, 700)
                Image.fromarray(face(label, offset + i)).save(folder / f"{i:03d}.png")
    return root


def zip_folder(folder: Path, target: Path, prefix: str = "") -> Path:
    """Zip every file under `folder` into `target`, member names relative to it under `prefix`."""
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return target


def write_csv(path: Path, rows: list[tuple[int, np.ndarray, str]]) -> Path:
    """Write fer2013.csv rows (emotion, 48x48 pixels, Usage)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", "pixels", "Usage"])
        for label, pixels, usage in rows:
            writer.writerow([label, " ".join(map(str, pixels.reshape(-1))), usage])
    return path


def tree_checksum(path: Path) -> str:
    """One sha256 over every file's relative path, bytes and mode under `path` (or of one file)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(str(p.stat().st_mode).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def kaggle_folder(tmp_path) -> Path:
    """A tiny Kaggle-layout folder: 6 train and 2 test images per class."""
    return write_layout(tmp_path / "kaggle", {"train": 6, "test": 2})


@pytest.fixture
def tiny_npz(tmp_path) -> str:
    """A small demo dataset artifact (about 80 train images): quick to train on for one epoch."""
    from fer_mlflow.data import dataset as ds
    from fer_mlflow.data.demo import make_demo

    return str(ds.save(make_demo(seed=0, per_class=12), tmp_path / "tiny.npz"))


def mlflow_run(entry_point: str, params: dict, tracking: str, timeout: int = 900,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """`mlflow run <project> -e <entry_point> --env-manager local -P k=v ...` as a user types it, in
    this process's environment (or `env`)."""
    command = [sys.executable, "-m", "mlflow", "run", str(PROJECT), "-e", entry_point,
               "--env-manager", "local"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    env = {**(os.environ if env is None else env), "MLFLOW_TRACKING_URI": tracking}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_keras_model(seed: int = 0):
    """The smallest model with the training contract: raw pixels (N, 48, 48, 1) in, 7 softmax out;
    another `seed`, other weights."""
    import keras  # here, not at the top: fer_mlflow must configure TensorFlow before it loads

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(7, activation="softmax")
    outputs = dense(x)
    # Large output weights make the classes well separated, so a wrong image shows as a wrong answer.
    dense.set_weights([np.random.default_rng(seed).normal(0, 8, (4, 7)), np.zeros(7)])
    return keras.Model(inputs, outputs)


def stop_group(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM a server started in its own process group (it and the workers it started), SIGKILL
    what outlives `timeout` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)


def postgres_binary(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian's postgresql package puts it."""
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0)
    return versions[-1] if versions else None


class Postgres:
    """A throw-away PostgreSQL server on a loopback port; `database()` makes a fresh database."""

    def __init__(self):
        import shutil
        import tempfile

        initdb, server = postgres_binary("initdb"), postgres_binary("postgres")
        if not (initdb and server):
            missing_service("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
        # The server refuses to run as root: as root, run it as the postgres user, in a folder it owns.
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.folder = Path(tempfile.mkdtemp(prefix="fer-postgres-"))
        if as_user:
            shutil.chown(self.folder, "postgres", "postgres")
        data = self.folder / "data"
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [*as_user, server, "-D", str(data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.count = 0
        deadline = time.monotonic() + 60
        while True:
            try:
                self.execute("SELECT 1")
                break
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"PostgreSQL did not start: {self.process.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)

    def execute(self, statement: str) -> None:
        """Run one SQL statement as the superuser `postgres`."""
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def database(self) -> str:
        """The URL of a new, empty database."""
        self.count += 1
        name = f"test_{self.count}"
        self.execute(f"CREATE DATABASE {name}")
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; this project ships psycopg2.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        import shutil

        stop_group(self.process, timeout=30)  # SIGTERM: a smart shutdown, clients are told
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """One throw-away PostgreSQL server for the session, removed at its end."""
    server = Postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def java() -> None:
    """Spark runs on Java: the tests that start Spark skip, saying so, on a machine without it."""
    import shutil

    if not shutil.which("java"):
        missing_service("Java is not installed, and Spark needs it: apt-get install default-jre-headless "
                        "(.ci/run does)")


@pytest.fixture
def postgres(postgres_server) -> str:
    """A fresh database on the session's PostgreSQL: its URL."""
    return postgres_server.database()


def start_mlflow_server(backend_store: str, artifacts: Path) -> tuple[str, subprocess.Popen]:
    """`mlflow server` on a free loopback port with `backend_store` and artifacts served through it
    from `artifacts`, once it answers /health: (url, process). Started without MLflow's job runner
    (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`, as docs/guides/teams-and-scale.md advises): the
    project runs no MLflow jobs, and the runner's five consumer processes only slow the start."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend_store, "--artifacts-destination", str(artifacts), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return url, process
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process)
            pytest.fail(f"mlflow server did not start: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture
def tracking_server(tmp_path, postgres):
    """A team's `mlflow server` on loopback: a PostgreSQL backend store, artifacts served through
    the server (``--artifacts-destination``), as the README's team section runs it."""
    url, server = start_mlflow_server(postgres, tmp_path / "server-artifacts")
    try:
        yield url
    finally:
        stop_group(server)
