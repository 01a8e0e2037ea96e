"""Make a shipped model (fer_mlflow/pretrained/files/<variant>) from a finished training run.

    MLFLOW_TRACKING_URI=sqlite:///<store> python tools/make_pretrained.py --run-id <train run> \\
        --data ../shared/data/fer2013-public.zip --title "cnn 32-64-128-256, 100 epochs" \\
        --variant accurate --command "mlflow run . -e train ..."

What it does, all of it with the project's own code:
1. chooses how the model serves on the *validation* split of the run's own data: on the face alone
   or with the default ten test-time views, whichever is more accurate there (`--views plain` keeps
   a variant made for speed on the face alone; both are still scored and recorded); fits the
   temperature for that choice on the same split (`calibration`);
2. logs that served model to a run of its own and scores it with the `evaluate` stage on the test
   split of `--data` (PublicTest for the FER2013 zip): what a user's `pretrained` reports;
3. writes model.keras (the network) and record.json (how it was made, the choices with their
   validation figures, the scores, the SHA-256 of model.keras).
Never tune on the test split: it is scored once, after every choice is made.

`--weights-dtype float16` stores the weights at half precision, half the file (what lets two networks
fit the package's 15 MB): the network's weights are rounded to float16 *before* step 1, so what is
chosen, scored and shipped is the rounded network, and model.keras is a standard Keras archive whose
weights file holds float16 arrays; Keras casts them back to the network's float32 as it loads them, so
the network still computes in float32 and `keras.models.load_model` reads it unchanged.

`--run-id` may also name an `ensemble` run (`mlflow run . -e ensemble -P runs=<a>,<b>`): the shipped
network is then the ensemble's one Keras model (its members side by side), and the record's
``training`` block describes the ensemble (its params and validation figures, the members' epochs and
minutes summed) with one block per member under ``members`` (a member that is a shipped model's
`pretrained` run brings the training block of the record it was shipped with).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import tempfile
import zipfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from fer_mlflow.learning.teaching import TEACHER_RUN_TAG, TEACHER_VERSION_TAG
from fer_mlflow.serving import calibration, pyfunc_model, views
from fer_mlflow.stages import evaluate
from fer_mlflow.tracking import registry
from fer_mlflow.data.dataset import model_input
from fer_mlflow.data.limits import Limits
from fer_mlflow.pretrained import FILES, RECORD_NAME, VARIANTS, model_file
from fer_mlflow.data.sources import read_source
from fer_mlflow.tracking.names import DATA_DIGEST_TAG, DATA_TAG, STAGE_TAG
from fer_mlflow.tracking.runs import metric_by_epoch, run_params

CURVES = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
MODEL_CONFIG_PARAMS = {"resume", "class_names", "temperature", "detector", *asdict(Limits())}
FINAL = ("best_val_accuracy", "best_epoch", "train_seconds", "train_images_per_second")
WEIGHTS_DTYPES = ("float32", "float16")
WEIGHTS_FILE = "model.weights.h5"  # the weights inside a Keras 3 archive
ENSEMBLE_FINAL = ("val_accuracy", "best_val_accuracy", "val_log_loss", "temperature", "val_ece", "val_ece_untempered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True, help="the finished training run")
    parser.add_argument("--data", required=True, help="the test data (PublicTest: the FER2013 zip)")
    parser.add_argument("--title", required=True, help="a few words naming the model")
    parser.add_argument("--variant", required=True, choices=VARIANTS, help="which shipped model it becomes")
    parser.add_argument("--views", default="best", choices=("best", "plain"),
                        help="best: the face alone or ten views, whichever scores higher on validation; plain: the face alone")
    parser.add_argument("--command", action="append", default=[], help="a command that made it (repeat)")
    parser.add_argument("--weights-dtype", default="float32", choices=WEIGHTS_DTYPES,
                        help="how model.keras stores the weights: float32, or float16 (half the file; the network "
                             "is rounded to it before it is chosen and scored)")
    args = parser.parse_args()

    client = MlflowClient()
    train = client.get_run(args.run_id)
    params = run_params(train)
    served = pyfunc_model.keras_model_of(registry.load_model(f"runs:/{args.run_id}/model"))
    if args.weights_dtype == "float16":
        rounded_to_half(served)
    val = read_source(params["data_uri"])[0].split("val")
    pixels = model_input(val.images)

    choices = {}
    for settings in (views.Settings(), views.Settings(tta=True)):
        probabilities = views.probabilities(served, pixels, settings)
        temperature = calibration.fit_temperature(probabilities, val.labels)
        choices[settings.key] = {
            "settings": asdict(settings), "val_accuracy": float(np.mean(probabilities.argmax(1) == val.labels)),
            "temperature": temperature,
            "val_ece_untempered": calibration.expected_calibration_error(probabilities, val.labels),
            "val_ece": calibration.expected_calibration_error(calibration.tempered(probabilities, temperature),
                                                              val.labels)}
        print(settings.key, choices[settings.key])
    considered = [views.Settings().key] if args.views == "plain" else list(choices)
    chosen = max((choices[key] for key in considered), key=lambda c: c["val_accuracy"])
    settings = views.Settings(**chosen["settings"])

    mlflow.set_experiment("pretrained-making")
    with mlflow.start_run(run_name=f"served {args.title}"):
        mlflow.set_tags({"fer.source_run": args.run_id})
        info = pyfunc_model.log_model(served, name="model", settings=settings, temperature=chosen["temperature"])
    scored = evaluate.run(model_uri=info.model_uri, data=args.data, split="test")
    evaluation = client.get_run(scored.run_id)
    folder = Path(client.download_artifacts(scored.run_id, ""))
    confusion = json.loads((folder / "confusion_matrix.json").read_text())
    per_class = pd.read_csv(folder / "per_class_metrics.csv")

    path = model_file(args.variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(served, path, args.weights_dtype)
    record = {
        "title": args.title,
        "model": train.data.tags.get("fer.model", params.get("model", "")),
        "model_family": train.data.tags.get("fer.model_family", ""),
        "class_names": list(val.class_names),
        "settings": asdict(settings),
        "settings_described": settings.describe(),
        "temperature": chosen["temperature"],
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
        "weights_dtype": args.weights_dtype,
        "parameters": int(served.count_params()),
        "made": {
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "date": datetime.now(timezone.utc).date().isoformat(),
            "commands": args.command,
            "machine": _machine(),
        },
        "training": training_block(client, train),
        "validation": {"images": len(val), "choices": choices, "considered": considered, "chosen": settings.key},
        "evaluation": {
            "split": "test", "part": "PublicTest", "data": evaluation.data.tags["fer.data"],
            "data_uri": args.data, "digest": scored.test_digest, "images": int(evaluation.data.params["images"]),
            "metrics": {k: v for k, v in evaluation.data.metrics.items() if k.startswith("test_")},
            "classes": confusion["classes"], "confusion_matrix": confusion["counts"],
            "per_class": {k: per_class[k].tolist() for k in ("precision", "recall", "f1", "support")},
            "evaluated_in_run": scored.run_id,
        },
    }
    (FILES / args.variant / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path} ({record['bytes'] / 1e6:.1f} MB) and its {RECORD_NAME}: "
          f"test_accuracy {record['evaluation']['metrics']['test_accuracy']:.4f} ({settings.describe()})")


def rounded_to_half(keras_model) -> None:
    """Round `keras_model`'s float32 weights to the nearest float16 (kept as float32), in place: the
    network that a float16 `save` stores, exactly."""
    keras_model.set_weights([w.astype(np.float16).astype(w.dtype) if w.dtype == np.float32 else w
                             for w in keras_model.get_weights()])


def save(keras_model, path: Path, weights_dtype: str = "float32") -> None:
    """`keras_model` saved to `path` as a Keras archive, its float32 weights stored as `weights_dtype`
    (float16: each array cast, the archive's configuration untouched; exact for a `rounded_to_half` model)."""
    if weights_dtype == "float32":
        keras_model.save(path)
        return
    with tempfile.TemporaryDirectory() as scratch:
        full = Path(scratch) / path.name
        keras_model.save(full)
        with zipfile.ZipFile(full) as archive, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
            for name in archive.namelist():
                data = archive.read(name)
                out.writestr(name, _half_weights(data) if name == WEIGHTS_FILE else data)


def _half_weights(h5: bytes) -> bytes:
    """A Keras weights file (HDF5 bytes) with every float32 array stored as float16, groups and attributes kept."""
    import h5py

    written = io.BytesIO()
    with h5py.File(io.BytesIO(h5), "r") as source, h5py.File(written, "w") as target:
        target.attrs.update(source.attrs)

        def copy(name: str, item) -> None:
            if isinstance(item, h5py.Dataset):
                values = item[()]
                target.create_dataset(name, data=values.astype(np.float16) if values.dtype == np.float32 else values)
                target[name].attrs.update(item.attrs)
            else:
                target.require_group(name).attrs.update(item.attrs)

        source.visititems(copy)
    return written.getvalue()


def training_block(client: MlflowClient, run) -> dict:
    """How the network of `run` was trained: a training run's params, epochs, minutes, final metrics
    and per-epoch curves; an ensemble run's own params and validation figures, with a block per member
    (`member_block`) and their epochs and minutes summed."""
    params = run_params(run)
    data_uri = params["data_uri"]
    data_run = client.get_run(data_uri.split("/")[1]) if data_uri.startswith("runs:/") else None
    block = {
        "run_id": run.info.run_id,
        "commit": run.data.tags.get("mlflow.source.git.commit", "")[:7],
        "data": run.data.tags.get(DATA_TAG, ""),
        "data_digest": run.data.tags.get(DATA_DIGEST_TAG, ""),
        "cleaned_in_run": data_run.info.run_id if data_run else "",
        # the stage's own params; MLflow also logged the model's config as params, which `pretrained`
        # logs again with the shipped model (its temperature and views differ): left out here.
        "params": {k: v for k, v in params.items() if k not in MODEL_CONFIG_PARAMS and "/" not in k},
    }
    if params.get("teacher"):
        block["teacher"] = teacher_block(client, run)
    if run.data.tags.get(STAGE_TAG) == "ensemble":
        members = [member_block(client, member) for member in params["members"].split(",")]
        metrics = {k: v for k, v in run.data.metrics.items() if k in ENSEMBLE_FINAL or k.startswith("member_")}
        return {**block, "kind": "ensemble", "epochs": sum(m["epochs"] for m in members),
                "minutes": sum(m["minutes"] for m in members), "metrics": metrics, "history": {}, "members": members}
    history = {key: metric_by_epoch(client, run.info.run_id, key) for key in CURVES}
    return {**block, "epochs": len(history["val_accuracy"]), "minutes": run.data.metrics["train_seconds"] / 60,
            "metrics": {k: run.data.metrics[k] for k in FINAL if k in run.data.metrics}, "history": history}


def teacher_block(client: MlflowClient, run) -> dict:
    """The teacher of a distilled training `run`: its URI, the run and registered version it named when
    the run began (`teaching.teacher_source`), and, for a shipped model's `pretrained` run, that shipped
    model's title, SHA-256 and date, so that a card can tell when the teacher is no longer the one shipped."""
    tags = run.data.tags
    block = {"uri": run_params(run)["teacher"], "run_id": tags.get(TEACHER_RUN_TAG, ""),
             "version": tags.get(TEACHER_VERSION_TAG, "")}
    if block["run_id"] and client.get_run(block["run_id"]).data.tags.get(STAGE_TAG) == "pretrained":
        shipped = shipped_record(client, block["run_id"])
        block.update({"title": shipped["title"], "shipped_sha256": shipped["sha256"], "made": shipped["made"]["date"]})
    return block


def member_block(client: MlflowClient, member: str) -> dict:
    """The training block of an ensemble's member (a run id, with ``#k`` for the k-th network of a
    shipped ensemble): its training run's (`training_block`), or, for a shipped model's `pretrained`
    run, the one recorded with that shipped model (with ``#k``, that of its k-th network)."""
    run_id, _, network = member.partition("#")
    run = client.get_run(run_id)
    if run.data.tags.get(STAGE_TAG) == "pretrained":
        shipped = shipped_record(client, run_id)
        if network:  # one network of the shipped ensemble: its own block as recorded there (its machine)
            return {**shipped["training"]["members"][int(network)], "within": shipped["title"],
                    "pretrained_run": run_id, "pretrained_network": int(network),
                    "taken_from_sha256": shipped["sha256"]}
        return {**shipped["training"], "title": shipped["title"], "shipped_sha256": shipped["sha256"],
                "made_commit": shipped["made"]["commit"], "machine": shipped["made"]["machine"],
                "pretrained_run": run_id}
    # a member trained in this store is taken to have trained on this machine
    block = training_block(client, run)
    return {**block, "title": network_title(block["params"], block["epochs"]), "machine": _machine()}


def network_title(params: dict, epochs: int) -> str:
    """A few words naming a trained network, as the shipped titles do: "cnn 40-80-160-320, 100 epochs"."""
    widths = f" {params['widths'].replace(',', '-')}" if params.get("model") == "cnn" and params.get("widths") else ""
    return f"{params.get('model', '?')}{widths}, {epochs} epochs"


def shipped_record(client: MlflowClient, run_id: str) -> dict:
    """The record a shipped model's `pretrained` run `run_id` logged with it."""
    return json.loads(Path(client.download_artifacts(run_id, "pretrained_record.json")).read_text())


def _machine() -> str:
    """The CPU's model name and core count, as /proc/cpuinfo gives them."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")]
    return f"{len(names)}-core {names[0] if names else 'unknown CPU'}, no GPU"


if __name__ == "__main__":
    main()
