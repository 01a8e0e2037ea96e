"""Where a sweep's study lives, and the lock that lets its workers share it.

Optuna's storages: none (in memory, one process), RDB (``postgresql://``, ``sqlite:///``) or a
journal file (any other path). `TrialLock` makes "count the study's trials, then ask for one" a
single step across every worker of a study, which Optuna itself does not: without it two workers
that both see 5 of 6 trials done would make a 7th.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import optuna

from fer_mlflow.tracking.credentials import check_url, masked
from fer_mlflow.errors import ConfigError

RDB_SCHEMES = ("sqlite", "postgresql")


def normalised(url: str) -> str:
    """`url` as SQLAlchemy should read it: a bare postgresql:// means psycopg2, which ships with the
    project (SQLAlchemy 2.1 reads it as psycopg 3)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


class TrialLock:
    """Makes 'count the study's trials, then ask for one' one step across all workers of a study:
    a file lock beside a journal or SQLite file, a PostgreSQL advisory lock, nothing in memory."""

    def __init__(self, storage: str, study: str):
        self.storage, self.study = storage, study
        self._release = None

    def __enter__(self):
        if not self.storage:
            return self
        if self.storage.startswith("postgresql"):
            import sqlalchemy

            engine = sqlalchemy.create_engine(normalised(self.storage), poolclass=sqlalchemy.pool.NullPool)
            connection = engine.connect()
            key = int.from_bytes(hashlib.sha256(self.study.encode()).digest()[:8], "big", signed=True)
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})

            def release():
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.close()
                engine.dispose()
        else:
            from optuna.storages.journal import JournalFileOpenLock

            path = self.storage.split("sqlite:///", 1)[1] if self.storage.startswith("sqlite:///") else self.storage
            study = hashlib.sha256(self.study.encode()).hexdigest()[:16]  # any study name, a safe file name
            lock = JournalFileOpenLock(f"{path}.{study}.trials")
            lock.acquire()
            release = lock.release
        self._release = release
        return self

    def __exit__(self, *exc):
        if self._release is not None:
            self._release()
            self._release = None


def open_storage(url: str):
    """Optuna storage for `url`: None (in memory) for "", RDB storage for a URL, else a journal file.
    A URL with a password is refused (`credentials`): libpq reads it from PGPASSWORD or ~/.pgpass."""
    if not url:
        return None
    if "://" in url:
        check_url("storage", url)
        scheme = url.split("://", 1)[0].split("+", 1)[0]
        if scheme not in RDB_SCHEMES:
            raise ConfigError(f"storage {masked(url)}: use postgresql://user@host:port/database, "
                              "sqlite:///path/to/file.db or a journal file's path")
        try:
            return optuna.storages.RDBStorage(normalised(url))
        except Exception as error:  # SQLAlchemy's and the driver's errors differ by database
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "no longer compatible with the table schema" in first:  # another program's Alembic table
                raise ConfigError(f"storage {masked(url)} holds another program's tables (MLflow's?): both keep "
                                  "Alembic's alembic_version table, so give the study a database of its own "
                                  "(e.g. createdb optuna)") from None
            raise ConfigError(f"storage {masked(url)} cannot be opened ({first}); "
                              "check that the database server runs and the URL names it") from None
    folder = Path(url).expanduser().resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"storage {url}: folder {folder} does not exist; create it or give another path")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(url))
