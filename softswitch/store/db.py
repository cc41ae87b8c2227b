"""The node's durable store: SQLite by default, PostgreSQL with the same schema (`store.url`).

SQLAlchemy Core (no ORM): the schema is a handful of tables and the queries are short; Core keeps the SQL
visible and portable across the two engines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()

#: Contact bindings of the registrar (RFC 3261 §10): the location store survives a restart.
bindings = sa.Table(
    "sip_bindings",
    metadata,
    sa.Column("aor", sa.String(128), primary_key=True),
    sa.Column("binding_key", sa.String(512), primary_key=True),
    sa.Column("contact", sa.Text, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)


@dataclass(frozen=True, slots=True)
class BindingRow:
    """One persisted binding; `data` holds the registrar's own fields as JSON."""

    aor: str
    binding_key: str
    contact: str
    expires_at: float
    data: dict[str, Any]


def _binding_row(r: Any) -> BindingRow:
    return BindingRow(r.aor, r.binding_key, r.contact, r.expires_at, json.loads(r.data))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Store:
    """Schema and queries. Every write is one transaction: a crash leaves no half-written record."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            if str(path) != ":memory:":
                path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # -- location store ---------------------------------------------------------------------------

    def load_bindings(self, now: float) -> list[BindingRow]:
        """Bindings still valid at `now`; expired rows are deleted in the same transaction."""
        return self.load_and_expire_bindings(now)[0]

    def load_and_expire_bindings(self, now: float) -> tuple[list[BindingRow], list[BindingRow]]:
        """(bindings still valid at `now`, bindings that expired while nobody watched); the expired rows
        are deleted in the same transaction, so each is reported once."""
        with self.transaction() as conn:
            expired = conn.execute(sa.select(bindings).where(bindings.c.expires_at <= now)).all()
            conn.execute(bindings.delete().where(bindings.c.expires_at <= now))
            rows = conn.execute(sa.select(bindings)).all()
        return [_binding_row(r) for r in rows], [_binding_row(r) for r in expired]

    def save_binding(self, row: BindingRow) -> None:
        """Insert or replace one binding."""
        with self.transaction() as conn:
            conn.execute(
                bindings.delete().where(
                    (bindings.c.aor == row.aor) & (bindings.c.binding_key == row.binding_key)
                )
            )
            conn.execute(
                bindings.insert().values(
                    aor=row.aor,
                    binding_key=row.binding_key,
                    contact=row.contact,
                    expires_at=row.expires_at,
                    data=json.dumps(row.data, separators=(",", ":")),
                )
            )

    def apply_binding_changes(self, upserts: list[BindingRow], deletes: list[tuple[str, str]]) -> None:
        """Write a batch of binding changes in one transaction (the edge writes behind, in batches)."""
        if not upserts and not deletes:
            return
        keys = [{"a": aor, "k": key} for aor, key in deletes]
        keys += [{"a": r.aor, "k": r.binding_key} for r in upserts]
        with self.transaction() as conn:
            # Two executemany statements per batch, whatever its size.
            conn.execute(
                bindings.delete().where(
                    (bindings.c.aor == sa.bindparam("a")) & (bindings.c.binding_key == sa.bindparam("k"))
                ),
                keys,
            )
            if upserts:
                conn.execute(
                    bindings.insert(),
                    [
                        {
                            "aor": r.aor,
                            "binding_key": r.binding_key,
                            "contact": r.contact,
                            "expires_at": r.expires_at,
                            "data": json.dumps(r.data, separators=(",", ":")),
                        }
                        for r in upserts
                    ],
                )

    def delete_binding(self, aor: str, binding_key: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                bindings.delete().where((bindings.c.aor == aor) & (bindings.c.binding_key == binding_key))
            )
