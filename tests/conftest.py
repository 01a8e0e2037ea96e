"""Shared fixtures: a temporary MLflow tracking store per test, and tiny FER2013-like sources."""

from __future__ import annotations

import csv
import hashlib
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from fer_mlflow.dataset import CLASS_NAMES

SHARED_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fer2013-public.zip"


@pytest.fixture(autouse=True)
def tracking(tmp_path, monkeypatch):
    """Every test gets its own sqlite tracking store and runs in its own working directory."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


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
