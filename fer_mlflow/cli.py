"""The command line: one click command per MLproject entry point, each a thin layer over a stage.

Commands parse and validate options, then call ``fer_mlflow.<stage>.run``. Errors a user can fix
(`FerError`, bad option values) print as one line on stderr and exit non-zero.
"""

from __future__ import annotations

import logging
import sys

import click

from fer_mlflow.errors import FerError

DATA_HELP = (
    "'demo', a FER2013 folder or .zip (Kaggle layout), fer2013.csv, "
    "or a clean run's dataset (runs:/<run_id>/dataset/dataset.npz)"
)
Probability = click.FloatRange(0.0, 1.0)


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
    from fer_mlflow import clean as stage
    from fer_mlflow.cleaning import CleanConfig

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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning user errors into one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        sys.exit(130)
    except click.UsageError as error:
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(2)
    except FerError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
