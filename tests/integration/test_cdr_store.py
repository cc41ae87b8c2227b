"""The CDR tests of tests/unit/test_cdr.py again, against a real PostgreSQL server.

A throwaway server is started for the session from the Debian `postgresql` package: `initdb` into a
temporary directory, `pg_ctl start` listening on 127.0.0.1 only on a free port, a fresh database per test,
`pg_ctl stop` at the end. When the package is missing and the suite runs as root it is installed with
apt-get; otherwise the tests fail saying how to install it (no silent skip).

The store URL is the plain `postgresql://…` a user writes in `store.url`; SQLAlchemy 2.1 maps it to the
psycopg (3) driver.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.integration.peers import LOOPBACK, free_port
from tests.unit.test_cdr import (  # the same tests and fixtures; `store_url` below is PostgreSQL
    store,
    switch,
    test_a_failed_close_leaves_the_conversation_open_not_half_written,
    test_a_failed_write_is_retried_until_the_store_takes_it,
    test_answered_call_released_by_the_callee,
    test_answered_call_released_by_the_caller,
    test_callee_busy_or_no_answer,
    test_caller_cancel,
    test_conversation_is_open_in_the_store_while_the_call_lasts,
    test_events_after_the_end_change_nothing,
    test_lookup_by_conversation_and_sip_call_id,
    test_number_not_found_is_a_caller_unanswered_single_leg,
    test_pages_walk_a_time_range_once_in_a_stable_order,
    test_query_arguments_are_checked,
    test_recovery_closes_what_a_crash_left_open,
    test_stop_flushes_pending_writes,
    test_stop_is_bounded_and_logs_what_the_store_did_not_take,
    test_time_limit,
    test_worker_failure_after_answer,
    test_worker_failure_before_answer_is_callee_unanswered,
)

#: apt-get may download and unpack the server (~17 MB, ~55 MB installed) on the first test.
INSTALL_TIMEOUT_S = 600
#: initdb, pg_ctl start and stop each take about a second here; generous for a loaded CI machine.
SERVER_TIMEOUT_S = 60
#: The first test may install the package; every other test finishes within seconds.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(INSTALL_TIMEOUT_S + 2 * SERVER_TIMEOUT_S)]

__all__ = [
    "store",
    "switch",
    "test_a_failed_close_leaves_the_conversation_open_not_half_written",
    "test_a_failed_write_is_retried_until_the_store_takes_it",
    "test_answered_call_released_by_the_callee",
    "test_answered_call_released_by_the_caller",
    "test_callee_busy_or_no_answer",
    "test_caller_cancel",
    "test_conversation_is_open_in_the_store_while_the_call_lasts",
    "test_events_after_the_end_change_nothing",
    "test_lookup_by_conversation_and_sip_call_id",
    "test_number_not_found_is_a_caller_unanswered_single_leg",
    "test_pages_walk_a_time_range_once_in_a_stable_order",
    "test_query_arguments_are_checked",
    "test_recovery_closes_what_a_crash_left_open",
    "test_stop_flushes_pending_writes",
    "test_stop_is_bounded_and_logs_what_the_store_did_not_take",
    "test_time_limit",
    "test_worker_failure_after_answer",
    "test_worker_failure_before_answer_is_callee_unanswered",
]

SERVER_USER = "postgres"  # PostgreSQL refuses to run as root


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def _install_postgresql() -> Path:
    bin_dir = _bin_dir()
    if bin_dir is not None:
        return bin_dir
    if os.geteuid() != 0:
        pytest.fail(
            "PostgreSQL is not installed: run `sudo apt-get install -y postgresql` "
            "(the CDR store tests start their own throwaway server from it)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
            env=env, check=True, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        pytest.fail(
            f"PostgreSQL is not installed and `apt-get install -y postgresql` failed: {exc}\n{detail}"
        )
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.fail("apt-get installed postgresql but no /usr/lib/postgresql/*/bin/pg_ctl appeared")
    return bin_dir


@dataclass(frozen=True)
class PgServer:
    port: int
    admin_url: str

    def url(self, database: str) -> str:
        return f"postgresql://{SERVER_USER}@{LOOPBACK}:{self.port}/{database}"


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], log: Path) -> None:
    done = subprocess.run(
        _as_server_user(argv), capture_output=True, text=True, timeout=SERVER_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        server_log = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        pytest.fail(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{server_log}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bin_dir = _install_postgresql()
    root = Path(tempfile.mkdtemp(prefix="softswitch-pg-"))
    data, sockets, log = root / "data", root / "sock", root / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = free_port(udp=False)
    _run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", SERVER_USER, "-A", "trust", "-E", "UTF8",
         "--locale=C", "--no-sync"],
        log,
    )  # fmt: skip
    options = f"-k {sockets} -p {port} -h {LOOPBACK} -F"  # -F: no fsync, the data is thrown away
    _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"], log)
    try:
        yield PgServer(port, f"postgresql://{SERVER_USER}@{LOOPBACK}:{port}/postgres")
    finally:
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], log)
        shutil.rmtree(root, ignore_errors=True)


_databases = itertools.count(1)


@pytest.fixture
def store_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database on the throwaway server for each test."""
    name = f"cdr_test_{os.getpid()}_{next(_databases)}"
    admin = sa.create_engine(pg_server.admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield pg_server.url(name)
        with admin.connect() as conn, contextlib.suppress(sa.exc.DBAPIError):
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def test_the_store_really_is_postgresql(store_url: str) -> None:
    engine = sa.create_engine(store_url)
    try:
        assert engine.dialect.name == "postgresql"
        with engine.connect() as conn:
            assert str(conn.execute(sa.text("SELECT version()")).scalar_one()).startswith("PostgreSQL")
    finally:
        engine.dispose()
