"""The command line: one click command per MLproject entry point, each a thin layer over a stage.

Commands parse and validate options, then call ``fer_mlflow.<stage>.run``. Errors a user can fix
(`FerError`, bad option values) print as one line on stderr and exit non-zero.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from fer_mlflow.tracking import credentials
from fer_mlflow.learning import interrupts
from fer_mlflow import quiet
from fer_mlflow.errors import ConfigError, FerError, check_convs, check_widths
from fer_mlflow.serving.faces import CHOICES, MAX_FACES, MIN_FACE
from fer_mlflow.data.media import FRAMES_PER_SECOND
from fer_mlflow.serving.views import BATCH_SIZE, TTA_ROTATION, TTA_SHIFT, TTA_ZOOM

DATA_HELP = (
    "'demo', a FER2013 folder or .zip (Kaggle layout), fer2013.csv, "
    "or a clean run's dataset (runs:/<run_id>/dataset/dataset.npz)"
)
Probability = click.FloatRange(0.0, 1.0)
# models.MODEL_NAMES, written out so that the command line answers without importing Keras.
MODELS = click.Choice(["cnn", "cnn_shallow", "cnn_deep", "resnet50", "resnet101", "resnet152"])
# pretrained.VARIANTS, likewise without importing MLflow.
VARIANTS = click.Choice(["accurate", "fast"])
# ensemble.PRECISIONS, likewise.
PRECISIONS = click.Choice(["float32", "int8"])


class Auto(click.ParamType):
    """'auto' (None: let the stage choose by the model), or a value of the wrapped click type."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = f"{inner.name}|auto"

    def convert(self, value, param, ctx):
        if value is None or str(value).lower() == "auto":
            return None
        try:
            return self.inner.convert(value, param, ctx)
        except click.BadParameter as error:
            self.fail(f"{error.message} (or 'auto')", param, ctx)


class Widths(click.ParamType):
    """Comma-separated positive channel counts, e.g. 16,32,128,256, as a tuple of ints."""

    name = "widths"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return check_widths(tuple(int(part) for part in str(value).split(",")))
        except ValueError:
            self.fail(f"{value!r} is not channel counts separated by commas, e.g. 16,32,128,256", param, ctx)
        except ConfigError as error:
            self.fail(str(error), param, ctx)


class Convs(click.ParamType):
    """Convolutions per block of the cnn, one count for all blocks (2) or one per block (1,1,1,2)."""

    name = "convs"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return check_convs(tuple(int(part) for part in str(value).split(",")))
        except ValueError:
            self.fail(f"{value!r} is not counts separated by commas, e.g. 2 or 1,1,1,2", param, ctx)
        except ConfigError as error:
            self.fail(str(error), param, ctx)


@click.group()
def cli() -> None:
    """fer-mlflow: facial-expression recognition on FER2013, tracked with MLflow."""


@cli.command()
@click.option("--data", default="demo", show_default=True, help=DATA_HELP)
@click.option("--mean-low", default=0.1, show_default=True, type=Probability,
              help="Drop images whose mean pixel / 255 is at or below this (the report's rule).")
@click.option("--mean-high", default=0.9, show_default=True, type=Probability,
              help="Drop images whose mean pixel / 255 is at or above this.")
@click.option("--blank-std", default=2.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Drop near-constant images: pixel standard deviation below this (grey levels); 0 disables.")
@click.option("--drop-duplicates", default=True, show_default=True, type=bool,
              help="Keep one of pixel-identical images within a split.")
@click.option("--drop-leakage", default=True, show_default=True, type=bool,
              help="Drop train (val) images whose pixels also appear in val or test (test).")
@click.option("--drop-conflicts", default=True, show_default=True, type=bool,
              help="Drop pixel-identical images that carry different labels.")
@click.option("--clean-test", default=False, show_default=True, type=bool,
              help="Apply the rules to the test split too (off: test figures stay comparable).")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0.0, 0.5),
              help="Share of train taken (stratified) as validation when the source has none.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the validation split and demo data.")
def clean(data, mean_low, mean_high, blank_std, drop_duplicates, drop_leakage, drop_conflicts,
          clean_test, val_fraction, seed) -> None:
    """Read FER2013 from DATA, clean it, and log the cleaned dataset, counts and figures."""
    from fer_mlflow.stages import clean as stage
    from fer_mlflow.data.rules import CleanConfig

    if mean_low >= mean_high:
        raise click.BadParameter(f"mean_low ({mean_low}) must be below mean_high ({mean_high})")
    config = CleanConfig(
        mean_low=mean_low, mean_high=mean_high, blank_std=blank_std,
        drop_conflicts=drop_conflicts, drop_leakage=drop_leakage, drop_duplicates=drop_duplicates,
        splits=("train", "val", "test") if clean_test else ("train", "val"),
    )
    outcome = stage.run(data, config, val_fraction=val_fraction, seed=seed)
    removed = ", ".join(f"{rule} {len(idx)}" for rule, idx in outcome.result.removed.items())
    click.echo(f"removed {outcome.result.removed_total} images ({removed})")
    click.echo(f"cleaned dataset: {outcome.dataset_uri}")


@cli.command()
@click.option("--model", default="cnn", show_default=True,
              type=MODELS, help="cnn: the project's network; cnn_shallow, cnn_deep: the report's two CNNs; ResNets.")
@click.option("--data", default="demo", show_default=True, help=DATA_HELP + "; raw sources are cleaned first")
@click.option("--epochs", default="auto", show_default=True, type=Auto(click.IntRange(min=1)),
              help="Epochs (of phase 1 for pretrained ResNets); auto: the model's default.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per training step (the global batch, over all replicas and workers).")
@click.option("--optimizer", default="auto", show_default=True, type=Auto(click.Choice(["adamw", "sgd"])),
              help="sgd: Nesterov momentum 0.9; auto: sgd for cnn, adamw for the others.")
@click.option("--learning-rate", default="auto", show_default=True,
              type=Auto(click.FloatRange(min=0, min_open=True)),
              help="Peak rate; auto: 0.05 for sgd, 0.001 for adamw.")
@click.option("--weight-decay", default="auto", show_default=True, type=Auto(click.FloatRange(min=0)),
              help="Each step shrinks the weights by learning rate x this; auto: 0.005 for sgd, 0.0001 for adamw.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Soft targets: this share of each label spread over the classes (FER2013's labels are noisy).")
@click.option("--schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "constant"]),
              help="cosine: one-epoch warm-up then cosine decay to zero.")
@click.option("--time-budget", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Minutes of training (phase 1): stop then, the cosine decay timed to end there; "
                   "0: none. With it, epochs=auto means up to 1000.")
@click.option("--patience", default=15, show_default=True, type=click.IntRange(min=1),
              help="Stop after this many epochs without a better val_accuracy (best weights restored).")
@click.option("--class-weight", default="none", show_default=True, type=click.Choice(["none", "balanced"]),
              help="balanced: weight classes by n / (7 x count) (disgust is ~1.5% of FER2013).")
@click.option("--image-size", default="auto", show_default=True, type=Auto(click.IntRange(min=32)),
              help="Input size the model resizes 48x48 faces to; auto: the model's default.")
@click.option("--weights", default="auto", show_default=True,
              help="ResNets: auto, imagenet, none, or a local weights file (.h5 / .weights.h5).")
@click.option("--fine-tune-epochs", default=5, show_default=True, type=click.IntRange(min=0),
              help="With pretrained weights: phase 2 epochs, the top of the backbone unfrozen; 0 skips it.")
@click.option("--fine-tune-layers", default=30, show_default=True, type=click.IntRange(min=1),
              help="How many top backbone layers phase 2 unfreezes (BatchNorm stays frozen).")
@click.option("--fine-tune-learning-rate", default=1e-5, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Phase 2 learning rate.")
@click.option("--widths", default="20,40,80,160", show_default=True, type=Widths(),
              help="cnn only: channels of each of its blocks, e.g. 16,32,128,256 (one entry per block).")
@click.option("--convs", default="2", show_default=True, type=Convs(),
              help="cnn only: convolutions in each block, one count for all (2) or one per block (1,1,1,2): "
                   "fewer serve faster.")
@click.option("--dropout", default="auto", show_default=True,
              type=Auto(click.FloatRange(0, 1, max_open=True)),
              help="Dropout rate (cnn: after each block; ResNets: in the head); auto: the model's default.")
@click.option("--shift", default=0.1, show_default=True, type=click.FloatRange(0, 0.5),
              help="Augmentation: random shift, a fraction of the size; 0: off.")
@click.option("--flip", default=True, show_default=True, type=bool, help="Augmentation: random horizontal flip.")
@click.option("--rotation", default=10.0, show_default=True, type=click.FloatRange(0, 180),
              help="Augmentation: random rotation, in degrees; 0: off.")
@click.option("--zoom", default=0.1, show_default=True, type=click.FloatRange(0, 0.9),
              help="Augmentation: random zoom, a fraction; 0: off.")
@click.option("--erase", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Probability of random erasing: a random rectangle painted mid-grey.")
@click.option("--mixup", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="MixUp's alpha (e.g. 0.2): each training face blended with another, their targets alike; 0: off.")
@click.option("--cutmix", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="CutMix's factor (e.g. 1.0): a rectangle of another training face pasted in, the targets mixed "
                   "by its area; 0: off. With mixup too, each batch gets one of the two.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0.0, 0.5),
              help="As for clean: the share of train taken as validation when the source has none.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the validation split, the demo data and Keras.")
@click.option("--strategy", default="default", show_default=True,
              type=click.Choice(["default", "mirrored", "multi_worker"]),
              help="multi_worker: train on the machines of TF_CONFIG (README, Scale); the chief logs the run.")
@click.option("--checkpoint-minutes", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Log the whole training state to the run at most this often (0: after every epoch).")
@click.option("--resume", default="", help="The id of a stopped (KILLED or FAILED) training run: go on from its "
                                           "last checkpoint in that same run, with the same parameters.")
@click.option("--init", default="", help="Start from the weights of a logged model of the same network "
                                         "(runs:/<id>/model, models:/<name>@<alias>; #k after it: the k-th network "
                                         "of an ensemble, e.g. models:/fer-emotion@pretrained#0): fine-tune it "
                                         "rather than start from scratch.")
@click.option("--teacher", default="", help="Knowledge distillation: a logged model or ensemble (runs:/<id>/model, "
                                            "models:/<name>@<alias>) whose served probabilities join the labels "
                                            "as soft targets.")
@click.option("--distill-alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="With a teacher: its share of each training target; the label has the rest.")
@click.option("--distill-temperature", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="With a teacher: its probabilities are softened by this temperature first.")
@click.option("--ema", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Weight averaging: validate, and keep, an exponential moving average of the weights with "
                   "this momentum per step (e.g. 0.999); 0: off.")
def train(**options) -> None:
    """Train one model on DATA and log parameters, per-epoch metrics, figures and the model."""
    from fer_mlflow.stages import train as stage

    outcome = stage.run(stage.TrainConfig(**options))
    click.echo(f"best val_accuracy {outcome.best_val_accuracy:.4f} after {outcome.epochs_trained} epochs")
    click.echo(f"model: {outcome.model_uri}")


def check_train_value(name: str, value):
    """`value` of train parameter `name` parsed and checked as `train`'s option does (widths
    "16,32,128,256" becomes a tuple); a ConfigError naming the parameter when it is refused."""
    option = next((p for p in train.params if p.name == name), None)
    if option is None:
        raise ConfigError(f"{name} is not a train parameter")
    try:
        return option.type.convert(value, option, None)
    except click.BadParameter as error:
        message = error.message.removesuffix(" (or 'auto')")  # Auto's hint: a space bound is never auto
        raise ConfigError(f"{name}={value!r}: {message}") from None


def train_options(args: list[str]) -> dict:
    """Train options given on a command line (``--learning_rate 0.1`` as `mlflow run` passes an extra
    ``-P learning_rate=0.1``, or ``--learning-rate 0.1``), parsed and checked by `train`'s own options:
    {TrainConfig field: value} for those given."""
    from click.core import ParameterSource

    args = [arg.replace("_", "-") if arg.startswith("--") else arg for arg in args]
    try:
        context = train.make_context("train", list(args))
    except click.UsageError as error:
        raise click.UsageError(f"{error.format_message()} (the sweep passes the options of train through "
                               "to every trial: see fer-mlflow train --help)") from None
    return {name: value for name, value in context.params.items()
            if context.get_parameter_source(name) == ParameterSource.COMMANDLINE}


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", default="cnn", show_default=True,
              type=MODELS, help="cnn: the project's network; cnn_shallow, cnn_deep: the report's two CNNs; ResNets.")
@click.option("--data", default="demo", show_default=True, help=DATA_HELP + "; raw sources are cleaned once")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1),
              help="Trials in the study, over all its workers.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Trials at once on this machine: this process and N-1 more, on one study.")
@click.option("--storage", default="", help="Optuna storage shared by workers: postgresql://user@host/db "
                                            "(no password: PGPASSWORD or ~/.pgpass), sqlite:///... "
                                            "or a journal file's path; empty: in memory (a journal in a "
                                            "temporary folder with workers > 1).")
@click.option("--study", default="", help="Study name; workers with the same storage and study share it. "
                                          "Empty: a new study named after the model, data and time.")
@click.option("--space", default="", help="A YAML file replacing the model's search space: "
                                          "{parameter: {low, high, log, step} or {choices: [...]}}.")
@click.option("--time-budget", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Minutes for the whole sweep: no trial starts that could not end in it; 0: none.")
@click.option("--trial-time-budget", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Minutes of training per trial (train's time_budget); 0: the model's epochs.")
@click.option("--prune-warmup", default=3, show_default=True, type=click.IntRange(min=0),
              help="Epochs a trial trains before the median pruner may stop it.")
@click.option("--sampler-seed", default="auto", show_default=True, type=Auto(click.INT),
              help="TPE's seed (worker i adds i); auto: 0, or fresh for each worker of a shared storage.")
@click.option("--baseline", default=True, show_default=True, type=bool,
              help="Make a new study's first trial the default recipe.")
@click.option("--evaluate", default=True, show_default=True, type=bool,
              help="Score the best trial's model on the test split, ready for promote.")
@click.option("--worker-index", default=0, hidden=True, type=click.IntRange(min=0))
@click.option("--deadline", default=None, hidden=True, type=float,
              help="The launcher's end of --time-budget, in seconds since the epoch: its workers share it.")
@click.pass_context
def sweep(context, **options) -> None:
    """Search train's parameters with Optuna (TPE, median pruning): a parent run, a nested train run
    per trial. Any other train option (e.g. --epochs 10) is fixed for every trial."""
    from fer_mlflow.stages import sweep as stage

    fixed = train_options(context.args)
    outcome = stage.run(stage.SweepConfig(**options), fixed, tuple(context.args), check=check_train_value)
    counts = ", ".join(f"{count} {state}" for state, count in outcome.counts.items() if count)
    click.echo(f"study {outcome.study} ({outcome.storage}): {counts}")
    if outcome.best_run_id:
        click.echo(f"best val_accuracy {outcome.best_value:.4f}: run {outcome.best_run_id} "
                   f"with {outcome.best_params}")
    if outcome.test_metrics:
        click.echo(f"its test_accuracy {outcome.test_metrics.get('test_accuracy', float('nan')):.4f} "
                   f"(evaluation run {outcome.evaluation_run_id})")
    click.echo(f"sweep run: {outcome.run_id}")


@cli.command()
@click.option("--run-id", default="", help="A training run whose model to evaluate.")
@click.option("--model-uri", default="", help="Or any model URI, e.g. models:/fer-emotion@champion.")
@click.option("--data", default="", help="Test data (" + DATA_HELP + "); empty: the training run's data.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]),
              help="Which split of DATA to score; metrics are named <split>_accuracy, ...")
@click.option("--tta", default="auto", show_default=True, type=Auto(click.BOOL),
              help="Average each prediction over views of the face, each also mirrored; auto: as the model serves.")
@click.option("--tta-rotation", default="auto", show_default=True, type=Auto(click.FloatRange(0, 45)),
              help=f"Views rotated this many degrees either way; 0: none; auto: the model's own ({TTA_ROTATION:g}).")
@click.option("--tta-zoom", default="auto", show_default=True, type=Auto(click.FloatRange(0, 0.5)),
              help=f"Views zoomed in and out by this fraction; 0: none; auto: the model's own ({TTA_ZOOM:g}).")
@click.option("--tta-shift", default="auto", show_default=True, type=Auto(click.IntRange(0, 12)),
              help=f"Views shifted this many pixels up, down, left and right; 0: none; "
                   f"auto: the model's own ({TTA_SHIFT}).")
@click.option("--batch-size", default=BATCH_SIZE, show_default=True, type=click.IntRange(min=1),
              help="Images per predict call: memory, not the answer.")
def evaluate(run_id, model_uri, data, split, tta, tta_rotation, tta_zoom, tta_shift, batch_size) -> None:
    """Evaluate a model as it serves on test (or val) data; log metrics, confusion matrices and predictions."""
    from fer_mlflow.stages import evaluate as stage

    outcome = stage.run(run_id or None, model_uri or None, data or None, tta, batch_size, tta_shift,
                        tta_rotation, tta_zoom, split=split)
    click.echo(" ".join(f"{k}={v:.4f}" for k, v in outcome.metrics.items()))
    click.echo(f"evaluation run: {outcome.run_id} (predicting {outcome.settings.describe()})")


@cli.command()
@click.option("--registered-model-name", default="auto", show_default=True,
              help="auto: fer-emotion-demo for models trained or scored on the demo data, else fer-emotion.")
@click.option("--metric", default="auto", show_default=True,
              help="Evaluation metric to rank by, higher is better (e.g. test_f1_macro); auto: <split>_accuracy.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val"]),
              help="Rank evaluations on this split (val: choose on validation data, report test).")
@click.option("--test-digest", default="", help="Compare evaluations on this data; empty: the newest's.")
@click.option("--rollback", default=False, show_default=True, type=bool,
              help="Give the champion alias back to the version that held it before; tag the other rejected.")
@click.option("--include-rejected", default=False, show_default=True, type=bool,
              help="Consider versions a rollback rejected.")
def promote(registered_model_name, metric, split, test_digest, rollback, include_rejected) -> None:
    """Register the best evaluated model and make it the champion if it beats the current one."""
    from fer_mlflow.stages import promote as stage

    outcome = stage.run(registered_model_name, metric, test_digest, rollback, split, include_rejected)
    click.echo(outcome.message)
    click.echo(f"models:/{outcome.registered_model_name}@champion is version {outcome.champion_version}")


@cli.command()
@click.option("--data", default="", help="Test data to score the shipped model on afresh (any source evaluate "
                                         "reads); empty: its recorded PublicTest scores.")
@click.option("--variant", default="accurate", show_default=True, type=VARIANTS,
              help="Which shipped model: the most accurate, or a narrower one distilled from it that serves faster.")
def pretrained(data, variant) -> None:
    """Register a model shipped with the project (trained on FER2013) under fer-emotion, alias
    'pretrained' ('pretrained-fast' for the fast variant); it becomes champion only by promote's rules."""
    from fer_mlflow.stages import pretrained as stage

    outcome = stage.run(data, variant)
    click.echo(outcome.message)
    click.echo(f"models:/fer-emotion@{stage.alias(variant)} is version {outcome.version}"
               + (" (and champion)" if outcome.champion else ""))


@cli.command()
@click.option("--runs", default="", help="Comma-separated ids of the training runs to combine; <id>#k: the k-th "
                                       "network (from 0) of a run whose model is an ensemble.")
@click.option("--top", default=0, show_default=True, type=click.IntRange(min=0),
              help="Or the best N finished training runs of the experiment on one data digest.")
@click.option("--metric", default="val_accuracy", show_default=True,
              help="With --top: the training-run metric to rank by, higher is better "
                   "(val_accuracy: each run's best_val_accuracy).")
@click.option("--data-digest", default="", help="With --top: only runs on this data; empty: the newest run's.")
@click.option("--weights", default="equal", show_default=True,
              help="equal, fitted (minimise the validation log-loss), or one number per member, e.g. 2,1,1.")
@click.option("--precision", default="float32", show_default=True, type=PRECISIONS,
              help="int8: serve the ensemble as an 8-bit integer network (calibrated on training faces), about "
                   "three times as fast on CPUs with AVX-512 VNNI or AMX; its figures are the 8-bit network's.")
@click.option("--data", default="", help="The members' dataset (runs:/<clean run>/dataset/dataset.npz) to weigh "
                                         "and score them on; empty: the first training member's. Needed when "
                                         "every member is a shipped model's run.")
def ensemble(runs, top, metric, data_digest, weights, precision, data) -> None:
    """Combine trained models into one served model that averages their probabilities."""
    from fer_mlflow.stages import ensemble as stage

    outcome = stage.run(runs, top, metric, data_digest, weights, precision, data)
    click.echo(f"ensemble of {len(outcome.members)}: val_accuracy={outcome.val_accuracy:.4f}, weights "
               + ", ".join(f"{w:.3f}" for w in outcome.weights))
    click.echo(f"ensemble run: {outcome.run_id}; evaluate it with -e evaluate -P run_id={outcome.run_id}")


@cli.command()
@click.option("--model-uri", default="models:/fer-emotion@champion", show_default=True,
              help="The model: a models:/<name>@<alias> or /<version> URI, or runs:/<run_id>/model; "
                   "the default with no champion registered yet: the shipped model.")
@click.option("--input", default="", help="A photo, a folder of photos and videos (searched recursively), "
                                          "a .zip of them, or a video (mp4, avi, webm, ...).")
@click.option("--detector", default="auto", show_default=True, type=click.Choice(CHOICES),
              help="Face detector; auto: the model's own (images of at most 64 pixels a side are crops); "
                   "blazeface: the fastest, for faces a tenth of the frame or larger (video, webcam); "
                   "none: each image is one face.")
@click.option("--every", default="auto", show_default=True, type=Auto(click.IntRange(min=1)),
              help=f"Videos: analyse every Nth frame; auto: {FRAMES_PER_SECOND} frames per second of video.")
@click.option("--max-annotated", default=50, show_default=True, type=click.IntRange(min=0),
              help="Log annotated copies (boxes and labels drawn) of this many inputs.")
@click.option("--min-face", default=MIN_FACE, show_default=True, type=click.IntRange(min=1),
              help="Smallest face searched for, in pixels.")
@click.option("--max-faces", default=MAX_FACES, show_default=True, type=click.IntRange(min=1),
              help="Most faces per image, the most confident first.")
def predict(model_uri, input, detector, every, max_annotated, min_face, max_faces) -> None:
    """Find and label every face in a photo, a folder, a zip or a video; log a table, annotated
    copies and figures."""
    from fer_mlflow.stages import predict as stage

    outcome = stage.run(model_uri, input, detector, every, max_annotated, min_face, max_faces)
    table = outcome.predictions
    faces = table[table["face"] >= 0]
    counts = ", ".join(f"{label} {count}" for label, count in faces["label"].value_counts().items())
    click.echo(f"{table['image'].nunique()} images, {len(faces)} faces ({counts or 'none'}); "
               f"{len(outcome.skipped)} files skipped")
    click.echo(f"prediction run: {outcome.run_id}")


@cli.command()
@click.option("--model-uri", default="models:/fer-emotion@champion", show_default=True,
              help="The model: a models:/<name>@<alias> or /<version> URI, or runs:/<run_id>/model.")
@click.option("--input", default="", help="A folder (searched recursively) or glob of photos, local or on any "
                                          "Hadoop file system (s3a://, abfss://, hdfs://), or a .parquet table "
                                          "with path and content columns.")
@click.option("--output", default="", help="A new folder for the Parquet output (a row per face).")
@click.option("--master", default="auto", show_default=True,
              help="Spark master, e.g. local[2] or spark://host:7077; auto: spark-submit's, else local[*].")
@click.option("--mode", default="faces", show_default=True, type=click.Choice(["faces", "udf"]),
              help="faces: find every face in each photo (mapInPandas); udf: each image is one face "
                   "(mlflow.pyfunc.spark_udf; needs --detector none).")
@click.option("--detector", default="auto", show_default=True, type=click.Choice(CHOICES),
              help="Face detector; auto: the model's own (images of at most 64 pixels a side are crops); "
                   "blazeface: the fastest, for faces a tenth of the photo or larger.")
@click.option("--min-face", default=MIN_FACE, show_default=True, type=click.IntRange(min=1),
              help="Smallest face searched for, in pixels.")
@click.option("--max-faces", default=MAX_FACES, show_default=True, type=click.IntRange(min=1),
              help="Most faces per image, the most confident first.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per predict call within a partition.")
def score(model_uri, input, output, master, mode, detector, min_face, max_faces, batch_size) -> None:
    """Label every face in a large set of photos on Apache Spark; write a row per face to Parquet."""
    from fer_mlflow.stages import score as stage

    outcome = stage.run(model_uri, input, output, master, mode, detector, min_face, max_faces, batch_size)
    click.echo(f"{outcome.images} images, {outcome.faces} faces, {outcome.images_without_face} without a face, "
               f"{outcome.skipped_files} unreadable, in {outcome.seconds:.1f} s; Parquet at {outcome.output}")
    click.echo(f"scoring run: {outcome.run_id}")


@cli.command("main")
@click.option("--data", default="demo", show_default=True, help=DATA_HELP)
@click.option("--models", default="cnn,resnet50", show_default=True, help="Comma-separated models to train.")
@click.option("--epochs", default="5", show_default=True, type=Auto(click.IntRange(min=1)),
              help="Epochs for every model ('auto': each model's own default).")
@click.option("--image-size", default="48", show_default=True, type=Auto(click.IntRange(min=32)),
              help="Input size for every model; 48 keeps the demo pipeline to minutes ('auto': each model's own).")
@click.option("--weights", default="auto", show_default=True, help="ResNet weights, as for train.")
@click.option("--registered-model-name", default="auto", show_default=True,
              help="auto: fer-emotion-demo for the demo data, else fer-emotion.")
@click.option("--metric", default="auto", show_default=True, help="Promote's metric; auto: test_accuracy.")
@click.option("--ensemble", default=False, show_default=True, type=bool,
              help="Also combine the trained models into an ensemble, evaluate it, and let promote choose it.")
def pipeline(data, models, epochs, image_size, weights, registered_model_name, metric, ensemble) -> None:
    """The whole pipeline: clean, train each model, evaluate each (and their ensemble), promote the best."""
    from fer_mlflow.stages import main as main_stage

    as_text = lambda value: "auto" if value is None else str(value)  # noqa: E731
    outcome = main_stage.run(data, models, as_text(epochs), as_text(image_size), weights,
                             registered_model_name, metric, ensemble)
    uri = outcome.champion_uri
    click.echo(f"champion: {uri}")
    click.echo("use it from Python:")
    click.echo(f"  import mlflow; model = mlflow.pyfunc.load_model('{uri}')")
    click.echo("  model.predict(images)  # N x 48 x 48 uint8 crops (or photos) -> a row per face: label, ...")
    link, command = main_stage.ui_link(outcome.experiment_id)
    if command:
        click.echo(f"see the runs: {command}, then open {link}")
    else:
        click.echo(f"see the runs: open {link}")


def quiet_progress_bars() -> None:
    """MLflow's artifact progress bars, off where no terminal shows them (a log file, CI, a
    pipe): there they are dozens of lines a stage. ``FER_VERBOSE=1``, or MLflow's own
    ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` set either way, decides instead."""
    if os.environ.get("FER_VERBOSE") != "1" and not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning user errors into one line and exit status 2."""
    if argv is None:  # a program's start (not a call from Python, whose stderr is the caller's)
        quiet.quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_progress_bars()
    interrupts.install()
    try:
        credentials.check_arguments(sys.argv[1:] if argv is None else list(argv))
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort as abort:  # click wraps KeyboardInterrupt, so also `interrupts.Interrupted`
        cause = abort.__cause__
        if isinstance(cause, interrupts.Interrupted):
            click.echo(f"stopped by {cause.signal_name}; the run ended KILLED", err=True)
            sys.exit(cause.exit_status)
        sys.exit(130)
    except click.UsageError as error:
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(2)
    except FerError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
