"""Model-registry reads and writes for `promote`, which never take a failure for an answer.

A read that fails (after MLflow's own HTTP retries and `retrying`'s) raises; only "this model does
not exist yet" (``RESOURCE_DOES_NOT_EXIST``) means "no versions" or "no aliases". Reading a failure
as "no champion" would register a duplicate and move ``champion`` without comparing.

Writes that fail part-way are undone: `restoring` notes the aliases before promote writes, puts them
back when a registry call fails, and raises a `RegistryError` in one line saying what it left.
"""

from __future__ import annotations

import logging
import platform
import random
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from packaging.requirements import InvalidRequirement, Requirement

from fer_mlflow.errors import ConfigError, RegistryError

log = logging.getLogger(__name__)

NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
# Answers that the same call will get again: raised at once rather than retried.
_FINAL_ERRORS = {NOT_FOUND, "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                 "PERMISSION_DENIED", "UNAUTHENTICATED"}


def retrying(call, *args, attempts: int = 5, **kwargs):
    """`call(*args, **kwargs)`, retried with backoff on errors that can pass (a locked SQLite
    database, a busy server); answers that will not change are raised at once, and so is a call
    MLflow's HTTP client has already retried (`_retried_by_mlflow`)."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except MlflowException as error:
            if error.error_code in _FINAL_ERRORS or _retried_by_mlflow(error) or attempt == attempts - 1:
                raise
            log.warning("tracking call %s failed (%s); retrying", call.__name__, first_line(error))
            time.sleep(0.2 * 2 ** attempt * random.uniform(0.5, 1.5))


def _retried_by_mlflow(error: MlflowException) -> bool:
    """Whether MLflow's HTTP client gave this call up after its own retries with backoff
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, minutes by default): a server that cannot be reached or kept
    failing. Retrying that again would multiply those minutes before the one-line error."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    return "Max retries exceeded" in str(error) and MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() > 0


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """{alias: version} of registered model `name`: none when the model does not exist yet."""
    try:
        return dict(retrying(client.get_registered_model, name).aliases)
    except MlflowException as error:
        if error.error_code == NOT_FOUND:
            return {}
        raise


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` names, or None when no version holds it."""
    version = aliases(client, name).get(alias)
    if version is None:
        return None
    try:
        return retrying(client.get_model_version, name, version)
    except MlflowException as error:
        if error.error_code == NOT_FOUND:  # deleted since (a concurrent duplicate): its alias went with it
            return None
        raise


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of `name` (none when it does not exist), lowest number first."""
    found = retrying(client.search_model_versions, f"name = '{name}'", max_results=10000)
    return sorted(found, key=lambda v: int(v.version))


def ensure_model(client: MlflowClient, name: str, description: str) -> None:
    """Create registered model `name` unless it exists (or another process creates it first)."""
    try:
        retrying(client.get_registered_model, name)
        return
    except MlflowException as error:
        if error.error_code != NOT_FOUND:
            raise
    try:
        retrying(client.create_registered_model, name, description=description)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


class AliasWriter:
    """Sets and deletes the aliases of one registered model, noting that it did so."""

    def __init__(self, client: MlflowClient, name: str):
        self.client, self.name, self.written = client, name, False

    def set(self, alias: str, version: str) -> None:
        self.written = True  # before the call: a write that fails may still have landed
        retrying(self.client.set_registered_model_alias, self.name, alias, version)

    def delete(self, alias: str) -> None:
        self.written = True
        retrying(self.client.delete_registered_model_alias, self.name, alias)


@contextmanager
def restoring(client: MlflowClient, name: str, watched: tuple[str, ...]):
    """Yield an `AliasWriter` for `name`. When a registry call in the block fails, the `watched`
    aliases are put back as they were before it and a `RegistryError` says so in one line (or, where
    even that fails, what they were)."""
    before = aliases(client, name)
    was = ", ".join(f"{alias} v{before[alias]}" if alias in before else f"no {alias}" for alias in watched)
    writer = AliasWriter(client, name)
    try:
        yield writer
    except MlflowException as error:
        failed = f"the model registry at {mlflow.get_registry_uri()} failed ({first_line(error)})"
        if writer.written:
            try:
                now = aliases(client, name)
                for alias in watched:
                    if alias in before and now.get(alias) != before[alias]:
                        retrying(client.set_registered_model_alias, name, alias, before[alias])
                    elif alias not in before and alias in now:
                        retrying(client.delete_registered_model_alias, name, alias)
            except MlflowException:
                raise RegistryError(f"{failed} and the aliases promote had begun to move could not be set "
                                    f"back: {name} had {was}; set them so once the registry answers"
                                    ) from error
        raise RegistryError(f"{failed}; promote stopped and left {name}'s aliases as they were ({was}); "
                            "run it again once the registry answers") from error


def first_line(error: Exception) -> str:
    """An error's message on one line, at most 240 characters: its start and its end, where MLflow
    puts the cause (``too many 500 error responses``, ``Connection refused``)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 240 else f"{text[:110]} ... {text[-125:]}"


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """`mlflow.pyfunc.load_model(model_uri)`, or a ConfigError in one line saying what to pass.

    The model is downloaded to a temporary folder removed once it is loaded (the Keras model is
    then in memory): MLflow's own download folder would stay in /tmp for every load from a remote
    artifact store. A requirement of the model that this environment does not meet is warned of in
    one line (`unmet_requirements`), as MLflow does, but without MLflow's check's scan of every
    installed package's files, which took about 2 s of each stage's start."""
    try:
        with tempfile.TemporaryDirectory(prefix="fer-model-") as folder:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=folder))
            unmet = unmet_requirements(local)
            if unmet:
                log.warning("model %s was logged in another environment: %s; its answers may differ here "
                            "(its requirements: `mlflow.pyfunc.get_model_dependencies(%r)`)",
                            model_uri, ", ".join(unmet), model_uri)
            return mlflow.pyfunc.load_model(str(local), suppress_warnings=True)
    except (MlflowException, OSError) as error:
        raise ConfigError(f"model {model_uri} could not be loaded ({str(error).splitlines()[0]}); pass the "
                          "id of a training run, or a models:/<name>/<version> or runs:/<id>/model URI") from error


def unmet_requirements(model_folder: Path) -> list[str]:
    """The pinned requirements (``requirements.txt``) and Python version (``python_env.yaml``) of
    the MLflow model in `model_folder` that this environment does not meet, each as
    ``"<requirement> (installed: <version or none>)"``."""
    unmet = []
    python = model_folder / "python_env.yaml"
    if python.is_file():
        logged, here = (yaml.safe_load(python.read_text()) or {}).get("python"), platform.python_version()
        if logged and str(logged).split(".")[:2] != here.split(".")[:2]:  # major.minor, as MLflow compares
            unmet.append(f"python {logged} (installed: {here})")
    requirements = model_folder / "requirements.txt"
    for line in requirements.read_text().splitlines() if requirements.is_file() else []:
        try:
            requirement = Requirement(line.strip())
        except InvalidRequirement:  # blank lines, comments, options, paths
            continue
        try:
            # An editable mlflow reports its version wrongly to importlib (MLflow's own check says so).
            installed = mlflow.__version__ if requirement.name == "mlflow" else metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{line.strip()} (installed: {installed or 'none'})")
    return unmet


def registered_version(model_uri: str) -> tuple[str | None, str | None]:
    """The training run and "<name>/<version>" of a ``models:/<name>/<version|@alias>`` URI; a
    logged model's own URI (``models:/m-...``) names no version: its run, if any."""
    client = MlflowClient()
    path = model_uri[len("models:/"):]
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            found = client.get_model_version_by_alias(name, alias)
        elif "/" in path:
            name, number = path.split("/", 1)
            found = client.get_model_version(name, number)
        else:
            return client.get_logged_model(path).source_run_id, None
    except MlflowException as error:
        raise ConfigError(f"model {model_uri} not found in {mlflow.get_registry_uri()}; "
                          "check the name and version (or alias)") from error
    return found.tags.get("source_run") or found.run_id, f"{found.name}/{found.version}"
