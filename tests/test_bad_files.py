"""Fault injection: the messy files real FER2013 downloads contain. Each is either skipped with a
count and a warning naming it and the reason, or, where the whole source is unusable, one line and
a non-zero exit; nothing crashes, hangs or ends up white."""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import face, write_csv
from PIL import Image

from fer_mlflow.data import reading
from fer_mlflow.cli import main
from fer_mlflow.data.dataset import CLASS_NAMES
from fer_mlflow.errors import DataError
from fer_mlflow.data.sources import read_source

CASES = {"train": str.upper, "TEST": str.capitalize}  # split folder -> how its class folders are cased


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def declared_huge_png(side: int = 7_000) -> bytes:
    """A tiny PNG whose header declares side x side pixels (49 megapixels, over the 40 limit): it
    must be refused before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def good_files() -> dict[str, bytes]:
    """Two readable faces per class and split, folders cased as downloads case them."""
    files = {}
    for split, case in CASES.items():
        for label, name in enumerate(CLASS_NAMES):
            for index in range(2):
                files[f"{split}/{case(name)}/{index}.jpg"] = jpeg(face(label, 100 * len(split) + index))
    return files


def odd_images() -> dict[str, bytes]:
    """Images that are readable but not 48x48 8-bit gray, each in the happy folder of train."""
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[..., 0] = 200
    sixteen = Image.fromarray((np.full((48, 48), 100 * 257)).astype(np.uint16))  # mid-grey, 16 bits
    transparent = Image.new("RGBA", (48, 48), (0, 0, 0, 0))  # fully transparent black
    return {"train/HAPPY/colour.png": png(Image.fromarray(rgb)), "train/HAPPY/sixteen.png": png(sixteen),
            "train/HAPPY/transparent.png": png(transparent)}


def broken_files() -> dict[str, str]:
    """name -> bytes of the files that must be skipped, each with the reason expected."""
    truncated = jpeg(face(3, 999))
    return {
        "train/HAPPY/empty.jpg": b"",
        "train/HAPPY/truncated.jpg": truncated[: len(truncated) // 3],
        "train/SAD/huge.png": declared_huge_png(),
    }


def write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """A download unpacked as it comes: a wrapper folder, junk beside the images, odd and broken
    images, a non-UTF-8 name, a FIFO, a dangling link and a class folder that is a symlink."""
    root = tmp_path / "download"
    top = root / "fer2013"
    write(top, {**good_files(), **odd_images(), **broken_files()})
    write(root, {"__MACOSX/fer2013/._train": b"\0\5\26\7", ".DS_Store": b"\0\0\0\1Bud1"})
    write(top, {"train/HAPPY/.DS_Store": b"\0\0\0\1Bud1", "train/HAPPY/Thumbs.db": b"\xd0\xcf\x11\xe0"})
    with open(os.path.join(os.fsencode(top / "train" / "HAPPY"), b"caf\xe9.jpg"), "wb") as handle:
        handle.write(jpeg(face(3, 555)))  # a Latin-1 name, not UTF-8
    os.mkfifo(top / "train" / "SAD" / "pipe.jpg")
    (top / "train" / "SAD" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    elsewhere = tmp_path / "more_angry"
    write(elsewhere, {"a.jpg": jpeg(face(0, 777)), "b.jpg": jpeg(face(0, 778))})
    linked = top / "TEST" / "Angry"
    for path in linked.iterdir():
        path.unlink()
    linked.rmdir()
    linked.symlink_to(elsewhere, target_is_directory=True)
    return root


SKIPPED_IN_FOLDER = {"train/HAPPY/empty.jpg", "train/HAPPY/truncated.jpg", "train/SAD/huge.png",
                     "train/SAD/pipe.jpg", "train/SAD/gone.jpg"}


def skipped_names(report) -> set[str]:
    return {entry.split(": ", 1)[0] for entry in report.skipped}


def test_a_messy_folder_is_read_with_each_bad_file_skipped_and_named(messy_folder, caplog):
    with caplog.at_level(logging.WARNING):
        dataset, report = read_source(str(messy_folder))
    assert skipped_names(report) == SKIPPED_IN_FOLDER
    reasons = dict(entry.split(": ", 1) for entry in report.skipped)
    assert "over the limit" in reasons["train/SAD/huge.png"]
    assert "not a regular file" in reasons["train/SAD/pipe.jpg"]
    assert "No such file" in reasons["train/SAD/gone.jpg"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in SKIPPED_IN_FOLDER:
        assert sum(name in message for message in warned) == 1
    ids = set(dataset.ids)
    assert "caf\ufffd.jpg" in {Path(i).name for i in ids}  # read, and its name writable as UTF-8
    "\n".join(ids).encode("utf-8")
    assert {"TEST/Angry/a.jpg", "TEST/Angry/b.jpg"} <= ids  # the symlinked class folder was followed
    assert not any("Thumbs" in i or "DS_Store" in i or "MACOSX" in i for i in ids)
    pixels = {Path(i).name: image for i, image in zip(dataset.ids, dataset.images)}
    assert abs(int(pixels["sixteen.png"].mean()) - 100) <= 1  # 16 bits scaled, not clipped to white
    assert pixels["transparent.png"].min() == 255  # flattened onto white, as a browser shows it
    assert report.converted == 3  # colour, 16-bit, transparent
    assert len(dataset) == 2 * 2 * len(CLASS_NAMES) + 3 + 1  # good, odd, the Latin-1 name


def test_a_symlink_loop_is_one_clear_error(tmp_path):
    root = tmp_path / "data"
    write(root, good_files())
    (root / "train" / "HAPPY" / "again").symlink_to(root, target_is_directory=True)
    with pytest.raises(DataError, match="is a symlink loop"):
        read_source(str(root))


def test_a_messy_zip_skips_damaged_and_oversized_members(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "MAX_FILE_BYTES", 100_000)
    path = tmp_path / "messy.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in {**good_files(), **odd_images(), **broken_files()}.items():
            archive.writestr("fer2013/" + name, data)
        archive.writestr("__MACOSX/fer2013/._x.jpg", b"\0\5\26\7")
        archive.writestr("fer2013/train/HAPPY/Thumbs.db", b"\xd0\xcf\x11\xe0")
        archive.writestr("fer2013/train/SAD/bomb.jpg", b"\0" * 5_000_000, compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("fer2013/train/SAD/crc.jpg", jpeg(face(4, 4)), compress_type=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    marker = raw.index(b"fer2013/train/SAD/crc.jpg") + len(b"fer2013/train/SAD/crc.jpg")
    raw[marker + 200] ^= 0xFF  # one byte of the stored member's data: its CRC no longer matches
    path.write_bytes(bytes(raw))
    dataset, report = read_source(str(path))
    reasons = dict(entry.split(": ", 1) for entry in report.skipped)
    assert set(reasons) == {"train/HAPPY/empty.jpg", "train/HAPPY/truncated.jpg", "train/SAD/huge.png",
                            "train/SAD/bomb.jpg", "train/SAD/crc.jpg"}
    assert "a zip bomb" in reasons["train/SAD/bomb.jpg"] and "damaged" in reasons["train/SAD/crc.jpg"]
    assert len(dataset) == 2 * 2 * len(CLASS_NAMES) + 3


def fer_rows() -> list:
    return [(label, face(label, i), usage) for label in range(len(CLASS_NAMES)) for i, usage in
            enumerate(("Training", "Training", "PublicTest", "PrivateTest"))]


@pytest.mark.parametrize("encode", [
    lambda text: b"\xef\xbb\xbf" + text.encode(),  # Excel's UTF-8 with a byte-order mark
    lambda text: text.encode("utf-16"),
    lambda text: gzip.compress(text.encode()),
], ids=["bom", "utf16", "gzip"])
def test_csv_in_other_encodings_reads_the_same(tmp_path, encode):
    plain = write_csv(tmp_path / "plain.csv", fer_rows())
    other = tmp_path / "fer2013.csv"
    other.write_bytes(encode(plain.read_text()))
    expected, _ = read_source(str(plain))
    got, _ = read_source(str(other))
    assert np.array_equal(got.images, expected.images) and np.array_equal(got.labels, expected.labels)


@pytest.mark.parametrize("content, message", [
    (b"emotion,pixels,Usage\n0," + b"9" * 30 + b" 1,Training\n", "1 malformed row(s) at line(s) 2"),
    (b"emotion,pixels,Usage\n\xe9\xe9\xe9\n", "is not UTF-8 or UTF-16 text"),
    (b"\x1f\x8b\x08\x00broken", "could not be read"),
])
def test_unusable_csv_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "fer2013.csv"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit:
        main(["clean", "--data", str(path)])
    assert exit.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert message in line


@pytest.mark.slow
def test_a_truncated_dataset_artifact_is_one_line(tiny_npz, tmp_path, capsys):
    cut = tmp_path / "cut.npz"
    cut.write_bytes(Path(tiny_npz).read_bytes()[:2000])
    with pytest.raises(SystemExit) as exit:
        main(["train", "--data", str(cut), "--epochs", "1"])
    assert exit.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert "is not a dataset artifact of the clean entry point" in line


@pytest.mark.slow
def test_clean_on_the_messy_folder_counts_what_it_skipped(messy_folder):
    import mlflow
    from conftest import all_runs

    main_exit = None
    try:
        main(["clean", "--data", str(messy_folder)])
    except SystemExit as exit:
        main_exit = exit.code
    assert main_exit in (None, 0)
    (run,) = all_runs("tags.`fer.stage` = 'clean'")
    assert run.info.status == "FINISHED" and run.data.metrics["source/skipped"] == len(SKIPPED_IN_FOLDER)
    assert mlflow.get_run(run.info.run_id).data.metrics["source/converted"] == 3
