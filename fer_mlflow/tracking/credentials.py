"""Passwords never travel as parameters.

`mlflow run` logs every ``-P`` value as a run param before the project's code runs, prints the
command it runs, and `ps` shows that command's arguments (and those of the sweep workers it starts)
to every user of the machine. So a URL that carries a password (``user:PASSWORD@host`` or
``?password=...``) is refused wherever the project reads one; the password comes from where the
database client already looks: libpq reads ``PGPASSWORD``, ``~/.pgpass`` and the file
``PGPASSFILE`` names, so a URL without a password (``postgresql://optuna@db-host/optuna``) connects.

A refused value that `mlflow run` has already logged is in the run it opened for this command; that
run is ended and deleted (`forget_logged_run`), so the project's own searches never find it, and the
error says how to purge it from the store for good (``mlflow gc``) and to change the password.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlsplit

from fer_mlflow.errors import ConfigError

HOW = ("leave the password out of the URL and set PGPASSWORD, or put it in ~/.pgpass "
       "(or the file PGPASSFILE names), which the PostgreSQL client reads itself")
# `scheme://user:password@`: also catches a password that urlsplit cannot see (an unescaped / or #);
# `host:port/path@...` (digits then a slash after the colon) is a port, not a password.
_USERINFO_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^@/:\s]*:(?!\d+/)[^@\s]*@")


def carries_password(value: str) -> bool:
    """Whether `value` is a URL with a password in it: ``user:password@host`` or a ``password``
    query parameter (SQLAlchemy and libpq both accept ``?password=``)."""
    if "://" not in value:
        return False
    if _USERINFO_PASSWORD.match(value):
        return True
    try:
        parts = urlsplit(value)
        if parts.password:
            return True
        query = parse_qsl(parts.query)
    except ValueError:  # not a URL urlsplit can read (e.g. a bad port): the pattern above decided
        return False
    return any("password" in key.lower() for key, _ in query)


def masked(url: str) -> str:
    """`url` with its password (in the user part or the query) replaced by ``***``."""
    if not carries_password(url):
        return url
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in credentials else rest
    return f"{scheme}://" + re.sub(r"((?:^|[?&])[^=&]*password[^=&]*=)[^&]*", r"\1***", rest, flags=re.I)


def check_url(name: str, url: str) -> str:
    """`url` if it carries no password; else a ConfigError naming `name` and how to pass the password."""
    if carries_password(url):
        raise ConfigError(f"{name} {masked(url)} carries a password, which would be logged and shown on "
                          f"command lines: {HOW}")
    return url


def check_arguments(args: list[str]) -> None:
    """Refuse a command line any of whose values carries a password (ConfigError, one line).

    Under `mlflow run` the run it opened for this command has logged the value already: that run is
    ended FAILED and deleted, and the message gives its id to purge and says to change the password.
    """
    for index, arg in enumerate(args):
        option, _, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if not value or not carries_password(value):
            continue
        if not option:
            option = args[index - 1] if index and args[index - 1].startswith("--") else "a value"
        message = (f"{option} {masked(value)} carries a password, which must never be a parameter "
                   f"(mlflow run logs -P values; ps shows command lines): {HOW}")
        forgotten = forget_logged_run(value)
        if forgotten:
            message += (f"; run {forgotten}, which mlflow run had opened and logged it in, is deleted: purge it "
                        f"with `mlflow gc --run-ids {forgotten}` and change the password")
        raise ConfigError(message)


def forget_logged_run(secret: str) -> str | None:
    """End and delete the run `mlflow run` opened for this command (``MLFLOW_RUN_ID``) if it logged
    `secret` as a param; its id, or None when there is no such run.

    Params cannot be changed or removed once logged; a deleted run is left out of every search
    (the project's and the UI's) until ``mlflow gc`` removes it for good. Only a run whose params hold
    `secret` is touched, so a run the user named in ``MLFLOW_RUN_ID`` for other reasons is safe.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus

    client = MlflowClient()
    run = client.get_run(run_id)
    if not any(secret in value for value in run.data.params.values()):
        return None
    if run.info.lifecycle_stage == "deleted":
        return run_id
    if not RunStatus.is_terminated(run.info.status):  # so that mlflow run does not end it after us
        client.set_terminated(run_id, "FAILED")
    client.delete_run(run_id)
    return run_id
