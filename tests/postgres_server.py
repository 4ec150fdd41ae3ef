"""A real PostgreSQL server for tests, started and stopped by a fixture.

``postgres_url`` initialises a throw-away cluster in a temporary folder
(Debian's ``postgresql`` package: ``initdb`` and ``pg_ctl`` under
``/usr/lib/postgresql/<version>/bin``), starts it on 127.0.0.1 at a free port
with trust authentication, creates one database and yields its SQLAlchemy URL;
the server is stopped when the test session ends. PostgreSQL refuses to run as
root, so as root the server runs as the ``postgres`` user the package creates.

Without the binaries the fixture skips, unless ``PML_CRT_REQUIRE_POSTGRES=1``
(set by ``.ci/run``, which installs the package), where it fails instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

DATABASE = "pml_crt_tests"


def _bindir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str]) -> None:
    completed = subprocess.run(
        _as_server_user(command), capture_output=True, text=True, timeout=120, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stdout}{completed.stderr}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql+psycopg2://postgres@127.0.0.1:<port>/pml_crt_tests`` of a fresh server."""
    bindir = _bindir()
    if bindir is None:
        message = "PostgreSQL not found (Debian: apt-get install -y postgresql)"
        if os.environ.get("PML_CRT_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("psycopg2", reason="psycopg2 is in the test extra")
    # Not under pytest's base temp folder: that one is private to the user running pytest.
    folder = Path(tempfile.mkdtemp(prefix="pml_crt_postgres_"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    port = _free_port()
    _run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"])
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    log = folder / "server.log"
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"])
    try:
        address = ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        _run([str(bindir / "createdb"), *address, DATABASE])
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{DATABASE}"
    finally:
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(folder, ignore_errors=True)
