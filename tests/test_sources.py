"""Reading FER2013 sources: every layout gives the same dataset; bad input gets a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import face, write_csv, write_layout, zip_folder
from PIL import Image

from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.errors import DataError
from fer_mlflow.data.sources import read_source


def test_kaggle_folder_reads_labels_splits_and_ids(kaggle_folder):
    dataset, report = read_source(str(kaggle_folder), val_fraction=1 / 3, seed=0)
    assert dataset.images.shape == (7 * 8, 48, 48) and dataset.images.dtype == np.uint8
    counts = dataset.counts()
    assert counts["test"] == {name: 2 for name in CLASS_NAMES}
    assert counts["val"] == {name: 2 for name in CLASS_NAMES}  # stratified: a third of 6 per class
    assert counts["train"] == {name: 4 for name in CLASS_NAMES}
    assert report.val_from_train and report.converted == 0 and not report.skipped
    happy = CLASS_NAMES.index("happy")
    i = list(dataset.ids).index("train/happy/003.png")
    assert dataset.labels[i] == happy and np.array_equal(dataset.images[i], face(happy, 3))


def test_validation_split_is_fixed_by_the_seed(kaggle_folder):
    first, _ = read_source(str(kaggle_folder), seed=1)
    again, _ = read_source(str(kaggle_folder), seed=1)
    other, _ = read_source(str(kaggle_folder), val_fraction=0.5, seed=2)
    assert np.array_equal(first.splits, again.splits)
    assert not np.array_equal(first.splits, other.splits)


def test_zip_reads_the_same_as_the_folder_even_when_wrapped(kaggle_folder, tmp_path):
    folder, _ = read_source(str(kaggle_folder))
    for prefix in ("", "fer2013/"):
        archive = zip_folder(kaggle_folder, tmp_path / f"fer{len(prefix)}.zip", prefix)
        zipped, report = read_source(str(archive))
        assert report.kind == "zip"
        assert np.array_equal(zipped.images, folder.images)
        assert np.array_equal(zipped.labels, folder.labels)
        assert list(zipped.ids) == list(folder.ids) and list(zipped.splits) == list(folder.splits)
    assert not (tmp_path / "train").exists()  # nothing was extracted next to the zip


def test_class_folders_only_become_one_test_split_and_match_case_insensitively(tmp_path):
    root = write_layout(tmp_path / "new", {"": 2}, folder_case=str.upper)
    dataset, _ = read_source(str(root))
    assert set(dataset.splits) == {"test"}
    assert dataset.counts()["test"] == {name: 2 for name in CLASS_NAMES}


def test_colour_and_resized_images_are_converted_and_counted(kaggle_folder):
    Image.new("RGB", (100, 80), (200, 30, 30)).save(kaggle_folder / "train" / "fear" / "colour.jpg")
    Image.fromarray(face(0, 99)).resize((64, 64)).save(kaggle_folder / "test" / "angry" / "big.png")
    dataset, report = read_source(str(kaggle_folder))
    assert report.converted == 2
    assert dataset.images.shape[1:] == (48, 48)


def test_csv_maps_usage_to_splits(tmp_path):
    rows = [(label, face(label, i), usage) for label in range(7) for i, usage in
            enumerate(["Training", "Training", "PublicTest", "PrivateTest"])]
    dataset, report = read_source(str(write_csv(tmp_path / "fer2013.csv", rows)))
    assert report.kind == "csv" and not report.val_from_train
    assert dataset.counts()["train"]["sad"] == 2 and dataset.counts()["val"]["sad"] == 1
    assert dataset.ids[0] == "fer2013.csv:2"
    assert np.array_equal(dataset.images[0], face(0, 0))


# --- bad input: one clear error each ---------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist.*demo"):
        read_source(str(tmp_path / "nowhere"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in the expected layout"):
        read_source(str(tmp_path / "empty"))


def test_unknown_class_folder(kaggle_folder):
    (kaggle_folder / "train" / "contempt").mkdir()
    Image.fromarray(face(0, 0)).save(kaggle_folder / "train" / "contempt" / "x.png")
    with pytest.raises(DataError, match="unknown class folder.*contempt"):
        read_source(str(kaggle_folder))


def test_corrupt_and_non_image_files_are_skipped_with_a_count(kaggle_folder, caplog):
    (kaggle_folder / "train" / "sad" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (kaggle_folder / "train" / "sad" / "notes.txt").write_text("hello")
    dataset, report = read_source(str(kaggle_folder))
    assert len(report.skipped) == 2 and len(dataset) == 7 * 8
    assert "skipped 2 file(s)" in caplog.text


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "bad" / "train" / "happy").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "happy" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable image: 1 file"):
        read_source(str(tmp_path / "bad"))


def test_csv_malformed_pixels_name_the_rows(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [(3, face(3, i), "Training") for i in range(5)])
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(" ", " x", 1)  # line 3: a non-number
    lines[4] = "4," + " ".join(["7"] * 100) + ",Training"  # line 5: too few pixels
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"2 malformed row\(s\) at line\(s\) 3, 5"):
        read_source(str(path))


def test_csv_without_the_expected_columns(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="emotion,pixels"):
        read_source(str(tmp_path / "x.csv"))


def test_zip_without_the_layout(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(face(0, 0)).save(loose / "a.png")
    with pytest.raises(DataError, match="no images in the expected layout"):
        read_source(str(zip_folder(loose, tmp_path / "loose.zip")))


def test_not_a_zip(tmp_path):
    (tmp_path / "fake.zip").write_bytes(b"PK nothing")
    with pytest.raises(DataError, match="not a readable zip"):
        read_source(str(tmp_path / "fake.zip"))


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="neither a folder"):
        read_source(str(tmp_path / "data.txt"))
