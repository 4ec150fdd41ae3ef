"""Where the studies live: Optuna's journal file in the tune folder, or a shared RDB URL.

:func:`open_storage` opens either (an RDB storage with Optuna's heartbeat, so that a
trial whose worker died on any machine is queued again); :func:`check_storage_url`
checks an RDB URL's driver and server before anything is written. Each method's study
is named :func:`study_name`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from benchmarks.protocol.config import UserError

__all__ = ["JOURNAL", "check_storage_url", "open_storage", "study_name"]

JOURNAL = "optuna.journal"


def study_name(config: Mapping[str, Any], method: str) -> str:
    """The name of ``method``'s study in ``config``'s search: ``<config name>/<method>``."""
    return f"{config['name']}/{method}"


def check_storage_url(storage: str) -> None:
    """Raise a one-line ``UserError`` unless the RDB URL ``storage`` can be used now.

    Its database driver must be installed (SQLAlchemy maps a bare ``postgresql://`` to
    psycopg 3, which pml-crt does not install; ``postgresql+psycopg2://`` uses the
    ``psycopg2-binary`` of the ``test`` extra) and its server must answer.
    """
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(storage)
        dialect = url.get_dialect()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as error:
        scheme = storage.split("://")[0]
        raise UserError(
            f"--storage {scheme}://...: not a database URL SQLAlchemy knows ({error})"
        ) from None
    shown = url.render_as_string(hide_password=True)
    try:
        dialect.import_dbapi()
    except ImportError as error:
        fix = (
            "use postgresql+psycopg2://... (pip install psycopg2-binary)"
            if url.get_backend_name() == "postgresql"
            else f"install the driver for {url.drivername}"
        )
        raise UserError(
            f"--storage {shown}: its database driver is not installed ({error}); {fix}"
        ) from None
    engine = sqlalchemy.create_engine(url, connect_args=_connect_timeout(url))
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise UserError(
            f"--storage {shown}: cannot connect ({reason}); start the server or fix the URL"
        ) from None
    finally:
        engine.dispose()


def _connect_timeout(url: Any) -> dict[str, Any]:
    """A short connection timeout, for the drivers that take one."""
    return {"connect_timeout": 10} if url.get_backend_name() == "postgresql" else {}


def open_storage(storage: str, heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    """An RDB URL (``postgresql://...``, ``sqlite:///...``) or the path of a journal file.

    With ``heartbeat`` (seconds) an RDB storage runs Optuna's heartbeat: a running trial
    whose worker, on any machine, stopped beating for ``2 * heartbeat`` seconds is
    failed and queued again by Optuna's ``RetryHeartbeatStaleTrialCallback``. A journal file has
    no heartbeat; :func:`requeue_dead_trials` looks for dead processes on this host.
    """
    if "://" in storage:
        if heartbeat is None:
            return optuna.storages.RDBStorage(storage)
        return optuna.storages.RDBStorage(
            storage,
            heartbeat_interval=int(heartbeat),
            grace_period=2 * int(heartbeat),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
        )
    backend = optuna.storages.journal.JournalFileBackend(storage)
    return optuna.storages.journal.JournalStorage(backend)
