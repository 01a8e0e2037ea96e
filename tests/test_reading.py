"""The one reader of folders and zips (`fer_mlflow.data.reading`), as `clean` meets it: member names
that try to leave their folder, and compressed data that inflates without a bound."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import face, write_csv
from PIL import Image

from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.errors import DataError
from fer_mlflow.data.sources import read_source

# Far past any ratio a photo or a CSV compresses by (the bound is 100), yet quick to build.
BOMB_BYTES = 20_000_000


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def faces_zip(path: Path, extra: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for label, name in enumerate(CLASS_NAMES):
            for index in range(2):
                archive.writestr(f"train/{name}/{index}.png", png(face(label, index)))
        for name, data in extra.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize("name, expected", [
    ("/tmp/x/PWNED.jpg", "tmp/x/PWNED.jpg"),
    ("../../x.jpg", "x.jpg"),
    ("a/../../b/./c.jpg", "a/b/c.jpg"),
    ("C:\\Users\\me\\..\\y.jpg", "Users/me/y.jpg"),
    ("\\\\server\\share\\z.jpg", "server/share/z.jpg"),
])
def test_member_names_are_made_relative_and_inside(name, expected, tmp_path):
    from fer_mlflow.data.reading import safe_name

    safe = safe_name(name)
    assert safe.as_posix() == expected
    assert (tmp_path / safe).resolve().is_relative_to(tmp_path)


def test_a_zip_member_that_inflates_like_a_bomb_is_skipped_unread(tmp_path):
    path = faces_zip(tmp_path / "faces.zip", {"train/happy/zeros.png": b"\0" * BOMB_BYTES})
    dataset, report = read_source(str(path))
    reasons = dict(entry.split(": ", 1) for entry in report.skipped)
    assert list(reasons) == ["train/happy/zeros.png"]
    assert "times its compressed size" in reasons["train/happy/zeros.png"]
    assert len(dataset) == 2 * len(CLASS_NAMES)


def test_a_gzipped_csv_that_inflates_like_a_bomb_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_bytes(gzip.compress(b"emotion,pixels,Usage\n" + b"0" * BOMB_BYTES))
    with pytest.raises(DataError, match="times its compressed size") as refused:
        read_source(str(path))
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)  # the CLI's one line


def test_a_gzipped_csv_over_the_size_limit_is_refused_and_one_under_it_read(tmp_path, monkeypatch):
    from fer_mlflow.data import reading

    rows = [(label, face(label, i), "Training") for label in range(len(CLASS_NAMES)) for i in range(3)]
    plain = write_csv(tmp_path / "plain.csv", rows)
    packed = tmp_path / "fer2013.csv"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    size = plain.stat().st_size
    monkeypatch.setattr(reading, "MAX_CSV_BYTES", size)
    assert len(read_source(str(packed))[0]) == len(rows)
    monkeypatch.setattr(reading, "MAX_CSV_BYTES", size - 1)
    with pytest.raises(DataError, match="over the .* MB limit"):
        read_source(str(packed))
