"""The `score` stage: label every face in a large set of images on Apache Spark, into Parquet.

Images are read with Spark's ``binaryFile`` source: a folder (searched recursively), a glob, or
either on any Hadoop file system (``s3a://``, ``abfss://``, ``hdfs://``); or, when `input` ends in
``.parquet``, a table with ``path`` and ``content`` (the encoded image) columns. Photos only
(`media.PHOTO_SUFFIXES`, any case); what `reading.junk` leaves out (hidden files, ``__MACOSX``,
``Thumbs.db``) is left out here too, and a file over `reading.MAX_FILE_BYTES` is never read: it
gives an error row, as a null or unreadable ``content`` does. Two ways to score:

- ``mode=faces`` (default): ``mapInPandas`` over the partitions. Each image takes the served
  model's own path (`pyfunc_model.predict_photos`: decoded, its faces found with `detector`, each
  face a row), so a photo gives a row per face, or one row with face -1 when it has none. An
  unreadable file gives one row with its ``error`` and is counted, and the job goes on.
- ``mode=udf``: ``mlflow.pyfunc.spark_udf`` with ``detector=none``: each image is one face and one
  row. For face crops, and the way to call the model from Spark code of one's own
  (``udf(struct(col("content").alias("image")))``); one unreadable file fails its whole batch.

The model is downloaded once, on the driver, and shipped to the executors as a zip with
``SparkContext.addArchive`` (unpacked there; a cluster refuses a local folder); each Python worker
loads it once and keeps it. The `fer_mlflow` package goes with it as a zip (``addPyFile``), so
executors need only the model's pip requirements. On a ``local`` master the Python workers run the
driver's interpreter; on a cluster, the cluster's own (`PYSPARK_PYTHON` or ``spark.pyspark.python``
as its users set it), since the driver's path need not exist there.

Output: Parquet at `output` (which must not exist yet): ``path``, ``face``, ``x``, ``y``, ``w``,
``h``, ``face_confidence``, ``label``, ``probability``, one ``prob_<class>`` per class, ``error``.

One MLflow run (experiment ``fer-predictions`` unless one is chosen) records params ``model_uri``
(a registered version by number), ``input``, ``output``, ``master``, ``mode``, ``detector``,
``min_face``, ``max_faces``, ``batch_size``; metrics ``images``, ``faces``,
``images_without_face``, ``skipped_files``, ``seconds`` (the Spark job) and ``images_per_second``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from fer_mlflow.serving import pyfunc_model
from fer_mlflow.data import reading
from fer_mlflow.errors import ConfigError, DataError
from fer_mlflow.serving.faces import BOX_COLUMNS, CHOICES, MAX_FACES, MIN_FACE
from fer_mlflow.data.limits import check_params
from fer_mlflow.data.media import PHOTO_SUFFIXES
from fer_mlflow.tracking.runs import log_params, stage_run
from fer_mlflow.tracking.names import MODEL_URI_TAG, PREDICT_EXPERIMENT

log = logging.getLogger(__name__)

MODES = ("faces", "udf")
BATCH = 64  # images per predict call within a partition
MODEL_FOLDER = "fer-score-model"  # the model's folder name among the files Spark ships
_LOADED: dict[str, object] = {}  # per Python worker: the model, loaded once
# A path with a part `reading.junk` leaves out (hidden, __MACOSX, Thumbs.db, desktop.ini).
JUNK_PATH = r"(?i)/(\.[^/]*|" + "|".join(name.replace(".", r"\.") for name in reading.JUNK_NAMES) + r")(/|$)"


@dataclass
class ScoreOutcome:
    """The scoring run and its counts."""

    run_id: str
    output: str
    images: int
    faces: int
    images_without_face: int
    skipped_files: int
    seconds: float


def run(model_uri: str, input: str, output: str, master: str = "auto", mode: str = "faces",
        detector: str = "auto", min_face: int = MIN_FACE, max_faces: int = MAX_FACES,
        batch_size: int = BATCH) -> ScoreOutcome:
    """Score every photo under `input` with the model at `model_uri` on Spark (`master`; ``auto``:
    the one spark-submit gave, else ``local[*]``) and write a row per face to Parquet at `output`."""
    from fer_mlflow.tracking.registry import load_model, registered_version

    if not input or not output:
        raise ConfigError("pass -P input=<folder, glob or .parquet table of images> and -P output=<new folder>")
    if mode not in MODES:
        raise ConfigError(f"mode={mode} is not one of {', '.join(MODES)}")
    if detector not in CHOICES:
        raise ConfigError(f"detector={detector} is not one of {', '.join(CHOICES)}")
    if mode == "udf" and detector != "none":
        raise ConfigError("mode=udf scores each image as one face: pass -P detector=none, or use mode=faces "
                          "to find the faces in photos")
    if min_face < 1 or max_faces < 1 or batch_size < 1:
        raise ConfigError("min_face, max_faces and batch_size must be at least 1")
    # The served model's ranges; batch_size is a predict param in mode=udf only.
    check_params({"min_face": min_face, "max_faces": max_faces, "batch_size": batch_size if mode == "udf" else None})
    if "://" not in output and Path(output).exists():
        raise ConfigError(f"output {output} exists; give a new folder (scoring never overwrites)")
    if model_uri.startswith("models:/"):
        _, version = registered_version(model_uri)
        model_uri = f"models:/{version}" if version else model_uri  # what was scored, by number
    params = {"detector": detector, "min_face": min_face, "max_faces": max_faces, "batch_size": batch_size}
    with tempfile.TemporaryDirectory(prefix="fer-score-") as folder:
        local = _download(model_uri, Path(folder))
        class_names = pyfunc_model.class_names_of(load_model(str(local)))  # fails here, in one line, if it cannot
        spark = session(master)
        images = _read(spark, input)
        with stage_run("score", f"score {Path(input.rstrip('/')).name or input}", {MODEL_URI_TAG: model_uri},
                       experiment=PREDICT_EXPERIMENT) as active:
            log_params({"model_uri": model_uri, "input": input, "output": output, "mode": mode,
                        "master": master, "master_resolved": spark.sparkContext.master, **params})
            if mode == "faces":
                shipped = _ship(spark, local, Path(folder))
                scored = images.mapInPandas(_Scorer(shipped, params, class_names), _schema(class_names))
            else:
                scored = _with_udf(spark, images, str(local), params, class_names)
            started = time.perf_counter()
            try:
                scored.write.parquet(output)
            except Exception as error:  # py4j / Spark analysis errors name the cause in their first line
                if "already exists" in str(error):
                    raise ConfigError(f"output {output} exists; give a new folder (scoring never overwrites)") \
                        from error
                raise
            seconds = time.perf_counter() - started
            counts = _counts(spark, output)
            mlflow.log_metrics({**counts, "seconds": seconds,
                                "images_per_second": counts["images"] / seconds if seconds else 0.0})
            log.info("scored %d images (%d faces, %d without one, %d unreadable) in %.1f s into %s",
                     counts["images"], counts["faces"], counts["images_without_face"], counts["skipped_files"],
                     seconds, output)
            return ScoreOutcome(active.info.run_id, output, counts["images"], counts["faces"],
                                counts["images_without_face"], counts["skipped_files"], seconds)


def session(master: str = "auto"):
    """A Spark session: on `master`, or with ``auto`` on the master spark-submit set, else local[*]."""
    try:
        from pyspark import SparkConf
        from pyspark.sql import SparkSession
    except ImportError as error:
        raise ConfigError("score runs on Apache Spark: pip install 'fer-mlflow[spark]' (pyspark; Java 17 or "
                          "newer too)") from error

    if master == "auto":
        master = SparkConf().get("spark.master", "local[*]")
    if master.startswith("local"):
        # Local Python workers run this interpreter (its packages), not whatever `python3` is first
        # on PATH. Not on a cluster: this path need not exist on its machines, whose Python is theirs
        # to choose (PYSPARK_PYTHON, or spark.pyspark.python through spark-submit).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("fer-mlflow score").master(master)
    # Arrow batches of encoded images: a smaller batch keeps a partition's memory in bounds.
    try:
        return builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", str(BATCH * 4)).getOrCreate()
    except Exception as error:  # no Java, or a master that cannot be reached: PySparkRuntimeError, Py4JError
        raise ConfigError(f"Spark could not start on master {master} ({str(error).splitlines()[0][:160]}); it needs "
                          "Java 17 or newer (apt-get install default-jre-headless) and a reachable master") from error


def _download(model_uri: str, folder: Path) -> Path:
    """The model's files, downloaded once into `folder` under a name of their own (a session scoring
    twice must not reuse the first model's files); a ConfigError in one line if they cannot be."""
    try:
        downloaded = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder / "download"))
    except (MlflowException, OSError) as error:
        raise ConfigError(f"model {model_uri} could not be downloaded ({str(error).splitlines()[0]}); pass a "
                          "models:/<name>/<version> or runs:/<id>/model URI") from error
    return Path(downloaded).rename(folder / f"{MODEL_FOLDER}-{uuid.uuid4().hex[:12]}")


def _read(spark, input: str):
    """The images as a DataFrame of ``path`` and ``content``; DataError when there are none."""
    from pyspark.sql import functions as F

    if input.rstrip("/").endswith(".parquet"):
        table = spark.read.parquet(input)
        missing = {"path", "content"} - set(table.columns)
        if missing:
            raise DataError(f"table {input} has no {', '.join(sorted(missing))} column; a table of images needs "
                            "path (string) and content (the encoded image, binary)")
        return table.select("path", "content")
    suffixes = ",".join(s.lstrip(".") for s in PHOTO_SUFFIXES)
    pattern = "*.{" + suffixes + "," + suffixes.upper() + "}"
    try:
        files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                 .option("pathGlobFilter", pattern).load(input))
    except Exception as error:  # AnalysisException: Path does not exist
        raise DataError(f"input {input} could not be listed ({str(error).splitlines()[0][:200]}); give a folder, "
                        "a glob or a .parquet table of images") from error
    # The reader's own filter and limit (`reading`): a file over the limit is listed (its length is
    # pushed down to the listing) but its content is never read, and it gives an error row.
    listed = files.where(~F.col("path").rlike(JUNK_PATH))
    within = listed.where(F.col("length") <= reading.MAX_FILE_BYTES).select("path", "content")
    over = listed.where(F.col("length") > reading.MAX_FILE_BYTES).select(
        "path", F.lit(None).cast("binary").alias("content"))
    return within.unionByName(over)


def _ship(spark, model: Path, folder: Path) -> str:
    """Send the model and the fer_mlflow package to every executor; the name the model's folder has
    there (`SparkFiles.get`). The model goes as an archive: Spark ships a local folder to local
    masters only (UNSUPPORTED_ADD_FILE.LOCAL_DIRECTORY on a cluster)."""
    package = Path(__file__).resolve().parents[1]
    archive = shutil.make_archive(str(folder / f"fer_mlflow-{model.name}"), "zip", root_dir=package.parent, base_dir=package.name)
    spark.sparkContext.addPyFile(archive)
    shipped = shutil.make_archive(str(folder / model.name), "zip", root_dir=model)
    spark.sparkContext.addArchive(shipped)
    return Path(shipped).name


def output_types(class_names) -> dict[str, str]:
    """The Parquet's columns, in order, and their Spark types."""
    return {"path": "string", **{name: "long" for name in BOX_COLUMNS[1:-1]}, BOX_COLUMNS[-1]: "double",
            "label": "string", "probability": "double", **{f"prob_{name}": "double" for name in class_names},
            "error": "string"}


def _schema(class_names) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in output_types(class_names).items())


class _Scorer:
    """The function ``mapInPandas`` runs over each partition: batches of (path, content) in, a row
    per face out. Picklable, and it loads the model once per Python worker."""

    def __init__(self, model_name: str, params: dict, class_names):
        self.model_name, self.params, self.class_names = model_name, params, list(class_names)

    def __call__(self, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        model = self._model()
        size = int(self.params["batch_size"])
        predict_params = {k: v for k, v in self.params.items() if k != "batch_size"}
        for frame in batches:
            for start in range(0, len(frame), size):
                yield score_images(model, frame.iloc[start:start + size], predict_params, self.class_names)

    def _model(self):
        if self.model_name not in _LOADED:
            from pyspark import SparkFiles

            # The driver loaded it first (`registry.load_model`) and told the user of any requirement
            # unmet; an executor's own warning would go to its log, after MLflow's seconds-long check.
            _LOADED[self.model_name] = mlflow.pyfunc.load_model(SparkFiles.get(self.model_name),
                                                                suppress_warnings=True)
        return _LOADED[self.model_name]


def score_images(model, frame: pd.DataFrame, params: dict, class_names) -> pd.DataFrame:
    """A row per face of each image in `frame` (``path``, ``content``), as `model` (a loaded pyfunc
    model) answers for it with `params`; an unreadable image gives one row with its ``error``."""
    from fer_mlflow.data.decode import open_rgb

    photos, paths, errors = [], [], []
    for path, content in zip(frame["path"], frame["content"]):
        try:
            if content is None:  # a null in a table, or a file over the reader's limit (`_read`)
                raise DataError(f"image 0 has no content (a null row, or a file over the "
                                f"{reading.MAX_FILE_BYTES / 1e6:g} MB limit)")
            photos.append(open_rgb(bytes(content)))
            paths.append(path)
        except (DataError, TypeError) as error:  # TypeError: content that is not bytes
            errors.append((path, str(error).removeprefix("image 0 ")))
    types = output_types(class_names)
    columns = list(types)
    parts = []
    if photos:
        found = pyfunc_model.predict_photos(model, photos, params)
        found.insert(0, "path", np.asarray(paths, dtype=object)[found["image"].to_numpy()])
        found["error"] = None
        parts.append(found.drop(columns="image"))
    if errors:
        parts.append(pd.DataFrame({"path": [p for p, _ in errors], "face": -1, "error": [e for _, e in errors]}))
    if not parts:
        return pd.DataFrame(columns=columns)
    table = pd.concat(parts, ignore_index=True).reindex(columns=columns)
    for column in (name for name, kind in types.items() if kind == "long"):
        table[column] = table[column].fillna(-1 if column == "face" else 0).astype("int64")
    table["label"] = table["label"].fillna("")
    # Plain numpy columns: Spark's Arrow conversion refuses pandas' Arrow-backed string columns.
    for column in (name for name, kind in types.items() if kind == "string"):
        table[column] = table[column].astype(object).where(table[column].notna(), None)
    floats = [name for name, kind in types.items() if kind == "double"]
    table[floats] = table[floats].astype("float64")
    return table


def _with_udf(spark, images, model: str, params: dict, class_names):
    """mode=udf: the model as MLflow's Spark UDF, one face per image."""
    from pyspark.sql import functions as F

    udf = mlflow.pyfunc.spark_udf(spark, model, env_manager="local",
                                  params={"detector": "none", "batch_size": int(params["batch_size"])})
    predicted = images.select("path", udf(F.struct(F.col("content").alias("image"))).alias("p"))
    columns = list(output_types(class_names))[1:-1]  # the model's own columns, less its image index
    return predicted.select("path", *[F.col(f"p.{c}").alias(c) for c in columns],
                            F.lit(None).cast("string").alias("error"))


def _counts(spark, output: str) -> dict[str, int]:
    from pyspark.sql import functions as F

    table = spark.read.parquet(output)
    row = table.agg(
        F.countDistinct("path").alias("images"),
        F.sum((F.col("face") >= 0).cast("long")).alias("faces"),
        F.sum(((F.col("face") == -1) & F.col("error").isNull()).cast("long")).alias("images_without_face"),
        F.sum(F.col("error").isNotNull().cast("long")).alias("skipped_files"),
    ).first()
    return {key: int(row[key] or 0) for key in ("images", "faces", "images_without_face", "skipped_files")}
