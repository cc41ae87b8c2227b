"""Persistence of the CTI core's snapshot (`CtiCore.snapshot()`): agents' state and queues' callers.

One row per agent and per queue (`cti_state`), keyed by node, kind and id, holding the JSON of that
subject; `save` replaces a node's rows in one transaction, so a crash leaves either the old snapshot or
the new one, never a mix. SQLAlchemy Core on the shared `metadata` of `softswitch.store.db`, on SQLite and
PostgreSQL alike. Synchronous: run it in a worker thread (`asyncio.to_thread`) from the adapter, which
saves after inputs that changed something and loads once at start-up before `CtiCore.restore`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from softswitch.store.db import Store, metadata

#: Longest agent or queue id stored (config ids are MQTT topic levels; 128 is ample).
MAX_ID_LENGTH = 128
#: Rows' `kind`: the snapshot's sections, plus one `meta` row with its version.
KIND_AGENT = "agent"
KIND_QUEUE = "queue"
KIND_META = "meta"

cti_state = sa.Table(
    "cti_state",
    metadata,
    sa.Column("node", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("id", sa.String(MAX_ID_LENGTH), primary_key=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("saved_at", sa.Float, nullable=False),
)

_SECTIONS = {KIND_AGENT: "agents", KIND_QUEUE: "queues"}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


class CtiStateStore:
    """The CTI snapshot of one node in a `Store`."""

    def __init__(self, store: Store, node: str) -> None:
        self.engine = store.engine
        self.node = node
        # A Store built before this module was imported lacks the table (create_all skips existing ones).
        metadata.create_all(self.engine, tables=[cti_state])

    def save(self, snapshot: Mapping[str, Any], now: float) -> None:
        """Replace the node's snapshot with `snapshot` in one transaction."""
        rows = [
            {
                "node": self.node,
                "kind": KIND_META,
                "id": "",
                "data": _dumps({"version": snapshot["version"]}),
                "saved_at": now,
            }
        ]
        for kind, section in _SECTIONS.items():
            for subject_id, data in sorted(snapshot.get(section, {}).items()):
                if len(subject_id) > MAX_ID_LENGTH:
                    raise ValueError(f"{kind} id longer than {MAX_ID_LENGTH}: {subject_id[:32]!r}…")
                rows.append(
                    {"node": self.node, "kind": kind, "id": subject_id, "data": _dumps(data), "saved_at": now}
                )
        with self.engine.begin() as conn:
            conn.execute(cti_state.delete().where(cti_state.c.node == self.node))
            conn.execute(cti_state.insert(), rows)

    def load(self) -> dict[str, Any] | None:
        """The node's last snapshot, or None if it never saved one."""
        query = sa.select(cti_state.c.kind, cti_state.c.id, cti_state.c.data).where(
            cti_state.c.node == self.node
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        meta = [r for r in rows if r.kind == KIND_META]
        if not meta:
            return None
        snapshot: dict[str, Any] = {
            "version": json.loads(meta[0].data)["version"],
            "agents": {},
            "queues": {},
        }
        for row in rows:
            section = _SECTIONS.get(row.kind)
            if section is not None:
                snapshot[section][row.id] = json.loads(row.data)
        return snapshot

    def clear(self) -> None:
        """Forget the node's snapshot (the next start-up begins with every agent logged out)."""
        with self.engine.begin() as conn:
            conn.execute(cti_state.delete().where(cti_state.c.node == self.node))
