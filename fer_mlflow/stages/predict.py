"""The `predict` stage: run a logged model over a photo, a folder, a zip or a video, and log what
it found, face by face.

The photos and frames (`media`) go through the model's own path from decoding on
(`pyfunc_model.predict_photos`, what ``model.predict`` does for an encoded photo), `CHUNK` of them a
call so that the network sees all their faces in one batch (and BlazeFace searches them in one). The run goes to the experiment
``fer-predictions`` unless the user chose one, and logs:

- params ``model_uri``, ``input``, ``detector``, ``every``, ``max_annotated``, ``min_face``,
  ``max_faces``, and ``detector_resolved`` / ``every_resolved`` where those were ``auto``;
- ``predictions.csv``: a row per face (``source`` file, video ``frame`` and ``time_s``, the face's
  ``track`` in its video (`tracks`: the boxes of one person through the analysed frames share an
  id, from 0 per video; empty for photos), then the served model's columns: ``image``, a running index over all photos and frames, ``face``, the box
  ``x``, ``y``, ``w``, ``h``, ``face_confidence``, ``label``, ``probability``, ``prob_<class>``); an
  image without a face has one row with face -1 and an empty label;
- ``annotated/``: the first `max_annotated` inputs with each face boxed and labelled (photos as
  JPEG, videos as MP4 at their own frame rate, each frame showing the latest analysed one's faces);
- ``figures/label_counts.png`` and, per video, ``figures/emotion_over_time/<video>.png`` (each
  class's probability against time, a panel per track: the `MAX_TRACKS_SHOWN` longest);
  ``videos.json`` (fps, frames, size and `every` of each video);
- metrics: ``photos``, ``videos``, ``frames`` (analysed), ``faces``, ``images_without_face``,
  ``skipped_files``, ``seconds``, ``images_per_second`` and ``faces_<label>``.

Unreadable files in a folder or zip are skipped with one warning each and counted; a missing
path, a folder with no photo or video, an unreadable video given alone or a model that cannot be
loaded is a one-line error before any run starts.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path, PurePosixPath

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from fer_mlflow.serving import annotate, pyfunc_model, tracks
from fer_mlflow.tracking import figures
from fer_mlflow.data import media
from fer_mlflow import pretrained
from fer_mlflow.data.reading import safe_name
from fer_mlflow.errors import ConfigError, DataError
from fer_mlflow.tracking.registry import load_model, registered_version
from fer_mlflow.serving.faces import CHOICES, MAX_FACES, MIN_FACE
from fer_mlflow.data.limits import check_params
from fer_mlflow.tracking.runs import log_params, stage_run
from fer_mlflow.tracking.names import MODEL_URI_TAG, MODEL_VERSION_TAG, PREDICT_EXPERIMENT, SOURCE_RUN_TAG

log = logging.getLogger(__name__)

DEFAULT_MODEL_URI = "models:/fer-emotion@champion"
MAX_ANNOTATED = 50
CHUNK = 16  # photos or frames per predict call
SOURCE_COLUMNS = ("source", "frame", "time_s", "track")
MAX_TRACKS_SHOWN = 6  # panels in a video's emotion-over-time figure: its longest tracks


@dataclass
class PredictOutcome:
    """The prediction run, its table (as logged in predictions.csv) and the files it skipped."""

    run_id: str
    predictions: pd.DataFrame
    skipped: list[str]


def run(model_uri: str = DEFAULT_MODEL_URI, input: str = "", detector: str = "auto", every: int | None = None,
        max_annotated: int = MAX_ANNOTATED, min_face: int = MIN_FACE, max_faces: int = MAX_FACES) -> PredictOutcome:
    """Predict the emotion of every face in `input` (a photo, a folder, a .zip or a video) with the
    model at `model_uri`, searching photos with `detector` (``auto``: the model's own), and for
    videos analysing every `every`-th frame (None: `media.FRAMES_PER_SECOND` a second). Logs the
    run described in the module docstring."""
    if not input:
        raise ConfigError("no input given; pass -P input=PATH: a photo, a folder, a .zip or a video")
    if detector not in CHOICES:
        raise ConfigError(f"detector={detector} is not one of {', '.join(CHOICES)}")
    if (every is not None and every < 1) or max_annotated < 0 or min_face < 1 or max_faces < 1:
        raise ConfigError("every, min_face and max_faces must be at least 1, and max_annotated at least 0")
    check_params({"min_face": min_face, "max_faces": max_faces})  # the served model's ranges
    with media.find(input) as found:  # the zip stays open, and its videos' copies kept, until the end
        sources = found.sources
        if len(sources) == 1 and sources[0].kind == "video":
            media.Video(sources[0], every).close()  # a video given alone must be readable: else an error now
        shipped = model_uri == DEFAULT_MODEL_URI and not _champion_registered()
        if shipped:
            log.info("no %s in the registry at %s yet: using %s; `fer-mlflow pretrained` registers it",
                     DEFAULT_MODEL_URI, mlflow.get_registry_uri(), pretrained.describe())
            model = pretrained.served_model()
        else:
            model = load_model(model_uri)
        tags = {MODEL_URI_TAG: model_uri, "fer.input": str(input)}
        model_label = model_uri.removeprefix("models:/")
        if shipped:
            tags.update({MODEL_URI_TAG: "shipped", pretrained.SHA_TAG: pretrained.record()["sha256"]})
            model_label = "the shipped model"
        elif model_uri.startswith("models:/"):
            source_run, version = registered_version(model_uri)
            tags.update({key: value for key, value in ((MODEL_VERSION_TAG, version), (SOURCE_RUN_TAG, source_run))
                         if value})
        elif model_uri.startswith("runs:/"):
            tags[SOURCE_RUN_TAG] = model_uri.split("/")[1]
            model_label = "run-" + tags[SOURCE_RUN_TAG][:8]
        name = f"predict {Path(str(input).rstrip('/')).name} with {model_label}"
        with stage_run("predict", name, tags, experiment=PREDICT_EXPERIMENT) as active, \
                tempfile.TemporaryDirectory() as folder:
            log_params({"model_uri": "shipped" if shipped else model_uri, "input": input, "detector": detector,
                        "every": "auto" if every is None else every, "max_annotated": max_annotated,
                        "min_face": min_face, "max_faces": max_faces})
            if detector == "auto":
                log_params({"detector_resolved": pyfunc_model.detector_of(model)})
            started = time.perf_counter()
            reader = media.Reader(sources, every)
            annotated = {source.name for source in sources[:max_annotated]}
            table = _predict(model, reader, {"detector": detector, "min_face": min_face, "max_faces": max_faces},
                             Path(folder), annotated, _estimate(sources, every))
            table.insert(SOURCE_COLUMNS.index("track"), "track", _tracks(table))
            classes = list(pyfunc_model.class_names_of(model))
            for source in sources:
                if source.name in reader.videos and source.name in annotated:
                    _annotate_video(source, reader.videos[source.name], table, Path(folder))
            seconds = time.perf_counter() - started
            if reader.videos:
                resolved = sorted({info.every for info in reader.videos.values()})
                if every is None:
                    log_params({"every_resolved": ",".join(map(str, resolved))})
                (Path(folder) / "videos.json").write_text(
                    json.dumps({name: asdict(info) for name, info in reader.videos.items()}, indent=2))
            table.to_csv(Path(folder) / "predictions.csv", index=False)
            mlflow.log_artifacts(folder)
            _log_figures(table, classes, reader.videos)
            mlflow.log_metrics(_metrics(table, reader, classes, seconds))
            if reader.skipped:
                log.warning("skipped %d unreadable file(s) of %d", len(reader.skipped), len(sources))
            outcome = PredictOutcome(active.info.run_id, table, reader.skipped)
    return outcome


def _champion_registered() -> bool:
    """Whether `DEFAULT_MODEL_URI` names a version: the registry answers that the model or alias
    does not exist (and only that: any other failure is raised, `registry.alias_version`)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fer_mlflow.tracking.registry import alias_version

    from fer_mlflow.errors import RegistryError
    from fer_mlflow.tracking.registry import first_line

    name, alias = DEFAULT_MODEL_URI.removeprefix("models:/").split("@")
    try:
        return alias_version(MlflowClient(), name, alias) is not None
    except MlflowException as error:
        raise RegistryError(f"the registry at {mlflow.get_registry_uri()} failed ({first_line(error)}); run "
                            "again once it answers, or set MLFLOW_TRACKING_URI to a store that does") from error


def _estimate(sources: list[media.Source], every: int | None) -> int:
    """How many photos and frames will be analysed (video lengths from their headers)."""
    total = 0
    for source in sources:
        if source.kind == "photo":
            total += 1
            continue
        try:
            with media.Video(source, every) as video:
                total += video.info.analysed
        except DataError:
            pass  # skipped, with its warning, when it is read
    return total


def _predict(model, reader: media.Reader, params: dict, folder: Path, annotated: set[str],
             total: int) -> pd.DataFrame:
    """The prediction table over every still of `reader`, annotating the photos named in `annotated`."""
    parts, count = [], 0
    stills = iter(reader)
    with _Progress(total) as progress:
        while chunk := list(islice(stills, CHUNK)):
            frame = pyfunc_model.predict_photos(model, [still.rgb for still in chunk], params)
            position = frame["image"].to_numpy()
            frame.insert(0, "source", [chunk[p].source.name for p in position])
            frame.insert(1, "frame", pd.array([chunk[p].frame for p in position], dtype="Int64"))
            frame.insert(2, "time_s", [np.nan if chunk[p].time_s is None else round(chunk[p].time_s, 3)
                                       for p in position])
            frame["image"] = position + count
            for p, still in enumerate(chunk):
                if still.frame is None and still.source.name in annotated:
                    _save_photo(annotate.draw(still.rgb, frame[position == p]), folder, still.source.name)
            parts.append(frame)
            count += len(chunk)
            progress.advance(len(chunk))
    if not parts:
        raise DataError(f"none of the {len(reader.sources)} files could be read ({', '.join(reader.skipped[:5])}"
                        f"{', ...' if len(reader.skipped) > 5 else ''}); see the warnings above")
    return pd.concat(parts, ignore_index=True)


def _annotated_path(folder: Path, name: str, suffix: str) -> Path:
    """Where the annotated copy of input `name` goes: under annotated/ at the same relative path
    (`reading.safe_name`: never outside it, whatever a zip member is called), with `suffix` added
    unless it ends so already (a.png -> a.png.jpg, b.jpg -> b.jpg)."""
    relative = safe_name(name).as_posix()
    if PurePosixPath(relative).suffix.lower() != suffix:
        relative += suffix
    path = folder / "annotated" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_photo(rgb: np.ndarray, folder: Path, name: str) -> None:
    Image.fromarray(rgb).save(_annotated_path(folder, name, ".jpg"), quality=90)


def _annotate_video(source: media.Source, info: media.VideoInfo, table: pd.DataFrame, folder: Path) -> None:
    """Write the video again with each frame showing the faces of the latest analysed frame."""
    import cv2

    rows = table[table["source"] == source.name]
    by_frame = {int(index): group for index, group in rows.groupby("frame")}
    path = _annotated_path(folder, source.name, ".mp4")
    log.info("writing the annotated video %s", path.name)
    writer = None
    try:
        with media.Video(source, info.every) as video:
            current, painted, size = rows.iloc[:0], None, None
            for index, _, rgb in video.frames(analysed_only=False):
                if index in by_frame or rgb.shape[:2] != size:  # drawn once, pasted on each frame till the next
                    current, size = by_frame.get(index, current), rgb.shape[:2]
                    painted = annotate.layer(*size, current)
                if writer is None:  # sized by the decoded frames, which the header may not match
                    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), info.fps or 30.0,
                                             (rgb.shape[1], rgb.shape[0]))
                where, colours = painted
                rgb[where] = colours
                writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    finally:
        if writer is not None:
            writer.release()


def _tracks(table: pd.DataFrame) -> pd.Series:
    """The track of each face of each video in `table` (`tracks.track` over its analysed frames,
    those without a face included); <NA> for photos and for rows without a face."""
    ids = pd.Series(pd.NA, index=table.index, dtype="Int64")
    for _, rows in table[table["frame"].notna()].groupby("source", sort=False):
        frames = [group[group["face"] >= 0] for _, group in rows.groupby("frame", sort=True)]
        for group, found in zip(frames, tracks.track(group[["x", "y", "w", "h"]].to_numpy() for group in frames)):
            ids[group.index] = found
    return ids


def _by_track(rows: pd.DataFrame, classes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A video's rows as `figures.emotion_over_time` series: its `MAX_TRACKS_SHOWN` longest tracks,
    each over the analysed frames from its first to its last (NaN where it was not found)."""
    times = rows.drop_duplicates("frame").set_index("frame")["time_s"].sort_index()
    faces = rows[rows["face"] >= 0]
    longest = faces["track"].value_counts(sort=False).sort_values(ascending=False, kind="stable")
    series = {}
    for track in sorted(longest.index[:MAX_TRACKS_SHOWN]):
        own = faces[faces["track"] == track].set_index("frame")
        span = times.loc[own.index.min():own.index.max()]
        probabilities = own[[f"prob_{c}" for c in classes]].reindex(span.index).to_numpy(dtype=float)
        series[f"track {track} ({len(own)} frames)"] = (span.to_numpy(dtype=float), probabilities)
    return series


def _log_figures(table: pd.DataFrame, classes: list[str], videos: dict[str, media.VideoInfo]) -> None:
    shown = [(figures.label_counts(table["label"].tolist(), classes), "figures/label_counts.png")]
    for name in videos:
        rows = table[table["source"] == name]
        count = rows["track"].nunique()
        title = f"{name}: each face tracked, every {videos[name].every} frames" + (
            f" (the {MAX_TRACKS_SHOWN} longest of {count} tracks)" if count > MAX_TRACKS_SHOWN else "")
        shown.append((figures.emotion_over_time(_by_track(rows, classes), classes, title),
                      f"figures/emotion_over_time/{name}.png"))
    for fig, path in shown:
        mlflow.log_figure(fig, path)
        plt.close(fig)


def _metrics(table: pd.DataFrame, reader: media.Reader, classes: list[str], seconds: float) -> dict[str, float]:
    images = table.drop_duplicates("image")
    faces = table[table["face"] >= 0]
    metrics = {
        "photos": float(images["frame"].isna().sum()), "videos": float(len(reader.videos)),
        "frames": float(images["frame"].notna().sum()), "faces": float(len(faces)),
        "images_without_face": float((images["face"] < 0).sum()), "skipped_files": float(len(reader.skipped)),
        "seconds": seconds, "images_per_second": len(images) / seconds if seconds > 0 else 0.0,
    }
    metrics.update({f"faces_{name}": float((faces["label"] == name).sum()) for name in classes})
    return metrics


class _Progress:
    """A progress bar (rich) over photos and frames on a terminal; else a log line per 10%."""

    def __init__(self, total: int):
        self.total, self.done, self.logged = max(total, 1), 0, 0
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import MofNCompleteColumn, Progress

            self.bar = Progress(*Progress.get_default_columns(), MofNCompleteColumn())
            self.task = self.bar.add_task("photos and frames", total=self.total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(self.task, completed=min(self.done, self.total))
            return
        tenths = min(10, self.done * 10 // self.total)
        if tenths > self.logged:
            self.logged = tenths
            log.info("predicted %d of about %d photos and frames (%d%%)", self.done, self.total, 10 * tenths)

    def __exit__(self, error_type, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif error_type is None and self.logged < 10:  # the estimate counted files that were skipped
            log.info("predicted %d photos and frames (100%%)", self.done)
