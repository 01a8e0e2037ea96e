"""Read FER2013 in every common form into one in-memory `Dataset`.

Sources (the `data` parameter of every entry point):
- ``demo``: a synthetic FER-like dataset drawn in code (no download);
- a folder in the Kaggle layout ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``, or a folder
  of ``<class>/`` subfolders only (all of it the test split: new data to evaluate on);
- the same layouts inside a ``.zip``, read member by member and never extracted;
- the challenge file ``fer2013.csv`` (``emotion,pixels,Usage``);
- a dataset artifact of the clean entry point: a local ``.npz`` or a URI such as
  ``runs:/<run_id>/dataset/dataset.npz``.

The source is only ever read. Colour or non-48x48 images are converted and counted, unreadable files
are skipped and counted, and where the source has no validation split a stratified one is taken from
train with a fixed seed.
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from fer_mlflow.data import dataset as ds
from fer_mlflow.data.dataset import CLASS_NAMES, IMAGE_SIZE, Dataset
from fer_mlflow.errors import DataError
from fer_mlflow.data.decode import FORMATS, gray, open_rgb, whole
from fer_mlflow.data import reading
from fer_mlflow.data.reading import Tree, gunzip, read_regular

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
CSV_USAGE = {"training": "train", "publictest": "val", "privatetest": "test"}
_ORIENTATION = 0x0112  # the EXIF tag of a photo stored sideways
WARNINGS = 20  # files skipped are warned of one by one up to this many, then counted
ARTIFACT_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "file://", "s3://", "gs://", "dbfs:/")


@dataclass
class SourceReport:
    """What reading a source found: its kind, and the images converted or skipped on the way."""

    kind: str
    location: str
    converted: int = 0
    skipped: list[str] = field(default_factory=list)
    val_from_train: bool = False


def is_artifact(data: str) -> bool:
    """Whether `data` names a clean-stage dataset artifact rather than a raw source."""
    return data.startswith(ARTIFACT_SCHEMES) or data.endswith(".npz")


def read_source(data: str, *, val_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, SourceReport]:
    """Read `data` (see the module docstring) into a Dataset; never writes to the source."""
    if data == "demo":
        from fer_mlflow.data.demo import make_demo

        dataset, report = make_demo(seed=seed), SourceReport("demo", "demo")
    elif is_artifact(data):
        return _read_artifact(data), SourceReport("artifact", data)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(
                f"data path {data} does not exist; pass a FER2013 folder, .zip or fer2013.csv, "
                "a clean run's dataset URI, or 'demo'"
            )
        if path.is_dir() or path.suffix.lower() == ".zip":
            with Tree(path) as tree:  # the one reader of folders and zips, with its filters and limits
                entries = ((entry.name, partial(tree.read, entry)) for entry in tree.entries)
                dataset, report = _read_images(entries, "folder" if path.is_dir() else "zip", str(path))
        elif path.suffix.lower() == ".csv":
            dataset, report = _read_csv(path)
        else:
            raise DataError(
                f"data {data} is neither a folder, a .zip, a .csv nor a .npz dataset artifact; "
                "pass one of those or 'demo'"
            )
    if not (dataset.splits == "val").any() and (dataset.splits == "train").any():
        dataset = _take_val_from_train(dataset, val_fraction, seed)
        report.val_from_train = True
    return dataset, report


def _read_artifact(uri: str) -> Dataset:
    if uri.endswith(".npz") and not uri.startswith(ARTIFACT_SCHEMES):
        if not Path(uri).exists():
            raise DataError(f"dataset artifact {uri} does not exist; pass an existing .npz or a runs:/ URI")
        return ds.load(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    # Into a folder removed once the arrays are in memory: MLflow's own would stay in /tmp.
    with tempfile.TemporaryDirectory(prefix="fer-dataset-") as folder:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        except (MlflowException, OSError) as error:
            raise DataError(
                f"cannot download dataset artifact {uri}: {str(error).splitlines()[0]}; "
                "check the run id and the artifact path (e.g. runs:/<run_id>/dataset/dataset.npz)"
            ) from error
        if Path(local).is_dir():
            found = sorted(Path(local).rglob("*.npz"))
            if len(found) != 1:
                raise DataError(f"{uri} holds {len(found)} .npz files; point at the dataset file itself")
            local = found[0]
        return ds.load(local)


def _take_val_from_train(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    train = np.flatnonzero(dataset.splits == "train")
    chosen = ds.stratified_val_split(dataset.labels[train], fraction, seed)
    splits = dataset.splits.copy()
    splits[train[chosen]] = "val"
    return Dataset(dataset.images, dataset.labels, splits, dataset.ids, dataset.class_names)


# An entry is (safe relative posix path, a function returning the file's bytes or raising OSError).
Entry = tuple[PurePosixPath, Callable[[], bytes]]


def _layout(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(split, class folder) for a path relative to the layout's root, or None if it is no image."""
    if len(parts) == 3 and parts[0].lower() in SPLIT_FOLDERS:
        return SPLIT_FOLDERS[parts[0].lower()], parts[1]
    if len(parts) == 2 and parts[0].lower() not in SPLIT_FOLDERS:
        return "test", parts[0]
    return None


def _strip_wrapper(paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Drop leading folders shared by every file (a zip often wraps its content in one)."""
    known = set(SPLIT_FOLDERS) | set(CLASS_NAMES)
    while paths and all(len(p) > 2 for p in paths) and len({p[0] for p in paths}) == 1:
        if paths[0][0].lower() in known:
            break
        paths = [p[1:] for p in paths]
    return paths


def _read_images(entries: Iterable[Entry], kind: str, location: str) -> tuple[Dataset, SourceReport]:
    report = SourceReport(kind, location)
    # Sorted by path, so a folder and its zip give the same order (and the same digests and splits).
    entries = sorted(entries, key=lambda entry: entry[0].parts)
    relative = _strip_wrapper([p.parts for p, _ in entries])
    placed = [(parts, _layout(parts), read) for parts, (_, read) in zip(relative, entries)]
    layouts = {"split" if len(parts) == 3 else "class" for parts, where, _ in placed if where}
    if not layouts:
        raise DataError(
            f"{location} has no images in the expected layout; it needs train/<class>/ and "
            f"test/<class>/ folders, or <class>/ folders, with classes {', '.join(CLASS_NAMES)}"
        )
    if len(layouts) > 1:
        raise DataError(
            f"{location} mixes <split>/<class>/ and <class>/ folders; keep one layout"
        )
    lookup = {name: code for code, name in enumerate(CLASS_NAMES)}
    unknown = sorted({where[1] for _, where, _ in placed if where and where[1].lower() not in lookup})
    if unknown:
        raise DataError(
            f"{location} has unknown class folder(s) {', '.join(unknown)}; class folders must be "
            f"named {', '.join(CLASS_NAMES)} (any case)"
        )
    images, labels, splits, ids = [], [], [], []
    for parts, where, read in placed:
        member = "/".join(parts)
        if where is None:
            report.skipped.append(f"{member}: not in the layout")
            continue
        try:
            raw = read()
        except OSError as error:  # vanished, unreadable, not a regular file, over the limit, damaged
            report.skipped.append(f"{member}: {error.strerror or error}")
            continue
        pixels = _decode(raw, member, report)
        if pixels is not None:
            images.append(pixels)
            labels.append(lookup[where[1].lower()])
            splits.append(where[0])
            ids.append(member)
    for skipped in report.skipped[:WARNINGS]:
        log.warning("skipped %s (in %s)", skipped, location)
    if report.skipped:
        more = len(report.skipped) - WARNINGS
        log.warning("skipped %d file(s) of %s%s", len(report.skipped), location,
                    f" ({more} not named above)" if more > 0 else "")
    if not images:
        raise DataError(
            f"{location} has no readable image: {len(report.skipped)} file(s) skipped "
            f"(e.g. {report.skipped[0] if report.skipped else 'none'}); it needs JPEG or PNG faces"
        )
    return Dataset(np.stack(images), labels, splits, ids), report


def _decode(raw: bytes, member: str, report: SourceReport) -> np.ndarray | None:
    """The 48x48 grayscale face in `raw`, opened as the served model opens images (`images.open_rgb`:
    16-bit scaled, transparency flattened onto white, size checked before decoding); None, with the
    reason in `report.skipped`, for anything that is not a readable image."""
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as image:
            # FER2013's own files, 48x48 8-bit gray and upright, are taken as they are (the fast path).
            if image.mode == "L" and image.size == (IMAGE_SIZE, IMAGE_SIZE) and not image.getexif().get(_ORIENTATION):
                return np.asarray(image, dtype=np.uint8)
        pixels = whole(gray(open_rgb(raw)))
    except (DataError, UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).removeprefix("image 0 ") if isinstance(error, DataError) else type(error).__name__
        report.skipped.append(f"{member}: {reason}")
        return None
    report.converted += 1  # past the fast path: decoded and converted
    return pixels


def _csv_text(path: Path) -> io.StringIO:
    """The CSV's text: UTF-8 (a byte-order mark allowed), UTF-16 with its mark, or either gzipped."""
    try:
        raw = read_regular(path, limit=reading.MAX_CSV_BYTES)
        if raw[:2] == b"\x1f\x8b":
            raw = gunzip(raw)  # within the same bounds as a zip member: size and ratio
        encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
        return io.StringIO(raw.decode(encoding), newline="")
    except OSError as error:
        raise DataError(f"{path} could not be read ({error}); pass a readable fer2013.csv") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 or UTF-16 text ({error.reason} at byte {error.start}); "
                        "save it as UTF-8 CSV") from error


def _read_csv(path: Path) -> tuple[Dataset, SourceReport]:
    with _csv_text(path) as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        if "emotion" not in header or "pixels" not in header:
            raise DataError(
                f"{path} needs the columns emotion,pixels[,Usage] of fer2013.csv; it has {','.join(header)}"
            )
        col_emotion, col_pixels = header.index("emotion"), header.index("pixels")
        col_usage = header.index("usage") if "usage" in header else None
        images, labels, splits, ids, bad = [], [], [], [], []
        for line, row in enumerate(reader, start=2):
            try:
                pixels = np.asarray(row[col_pixels].split(), dtype=np.int32)
                label = int(row[col_emotion])
                usage = CSV_USAGE[row[col_usage].strip().lower()] if col_usage is not None else "train"
            except (IndexError, ValueError, KeyError, OverflowError):
                bad.append(line)
                continue
            if pixels.size != IMAGE_SIZE * IMAGE_SIZE or pixels.min() < 0 or pixels.max() > 255 \
                    or not 0 <= label < len(CLASS_NAMES):
                bad.append(line)
                continue
            images.append(pixels.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))
            labels.append(label)
            splits.append(usage)
            ids.append(f"{path.name}:{line}")
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise DataError(
            f"{path}: {len(bad)} malformed row(s) at line(s) {shown}; each row needs an emotion 0-6, "
            f"{IMAGE_SIZE * IMAGE_SIZE} space-separated pixels 0-255 and a Usage of "
            "Training/PublicTest/PrivateTest; fix or remove those rows"
        )
    if not images:
        raise DataError(f"{path} has no data rows; it needs fer2013.csv's emotion,pixels,Usage rows")
    return Dataset(np.stack(images), labels, splits, ids), SourceReport("csv", str(path))
