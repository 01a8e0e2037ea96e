"""The package's layers: models logged before the move still load, and the import contracts hold;
and no file names an import or variable it never uses, or a name never defined (ruff, pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import PROJECT, tiny_keras_model

from fer_mlflow.serving.pyfunc_model import predict_pixels, save_model

# The script every model logged before the package had layers runs (its `_MODEL_CODE` then).
OLD_SCRIPT = (
    "import mlflow\n"
    "from fer_mlflow.pyfunc_model import FerEmotionModel\n"
    "mlflow.models.set_model(FerEmotionModel())\n"
)


@pytest.mark.slow  # saving exports ONNX: seconds
def test_a_model_logged_with_the_old_module_path_loads_and_predicts(tmp_path):
    keras_model = tiny_keras_model()
    folder = tmp_path / "model"
    save_model(keras_model, folder)
    scripts = [path for path in folder.glob("*.py")]
    assert len(scripts) == 1, scripts  # the models-from-code script, beside MLmodel
    scripts[0].write_text(OLD_SCRIPT)

    loaded = mlflow.pyfunc.load_model(str(folder))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 48, 48), dtype=np.uint8)
    served = predict_pixels(loaded, pixels)
    expected = keras_model.predict(pixels[..., None].astype("float32"), verbose=0)
    probabilities = served[[c for c in served.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the project's contracts (pyproject.toml) on the package found in `root`."""
    command = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", command, "--config", str(PROJECT / "pyproject.toml"), "--no-cache"],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=120)


def test_every_module_imports_only_the_rooms_below_its_own():
    done = lint(PROJECT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_lower_room_that_imports_a_stage_breaks_the_contract(tmp_path):
    shutil.copytree(PROJECT / "fer_mlflow", tmp_path / "fer_mlflow",
                    ignore=shutil.ignore_patterns("__pycache__", "files"))
    reaching_up = tmp_path / "fer_mlflow" / "data" / "dataset.py"
    reaching_up.write_text(reaching_up.read_text() + "\nfrom fer_mlflow.stages import train  # noqa: E402\n")

    done = lint(tmp_path)
    assert done.returncode == 1
    assert "fer_mlflow.data.dataset -> fer_mlflow.stages.train" in done.stdout


def ruff(root: Path) -> subprocess.CompletedProcess:
    """`ruff check` with the project's rules (pyproject.toml) on the files under `root`."""
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(PROJECT / "pyproject.toml"),
                           "--no-cache", "--output-format", "concise", "."],
                          cwd=root, capture_output=True, text=True, timeout=120)


def test_no_file_has_an_unused_import_or_variable_or_an_undefined_name():
    done = ruff(PROJECT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_unused_import_is_named_by_its_file_and_line(tmp_path):
    shutil.copytree(PROJECT / "fer_mlflow" / "data", tmp_path / "data", ignore=shutil.ignore_patterns("__pycache__"))
    unused = tmp_path / "data" / "dataset.py"
    unused.write_text(unused.read_text() + "\nimport fractions\n")
    line = len(unused.read_text().splitlines())

    done = ruff(tmp_path)
    assert done.returncode == 1
    assert f"data/dataset.py:{line}:8: F401 [*] `fractions` imported but unused" in done.stdout
