"""The durable event outbox and the per-subject `seq` counters (transactional outbox pattern).

Every event bound for the broker is inserted into `event_outbox` before it is published and deleted when
the broker acknowledges it (MQTT 3.1.1 §4.3.2: QoS 1 PUBLISH/PUBACK). A restart publishes what is left, in
insertion order (`id`). `event_subjects` holds the last `seq` handed out per subject (EVENTS.md: `seq`
gap-free per subject) and the subject's snapshot state (a device's bindings), written in the same
transaction as the events that advanced them, so a restart continues each sequence where the outbox left
it. Rows carry the node name: nodes sharing one PostgreSQL store keep separate outboxes and counters.

SQLAlchemy Core on the `metadata` of `softswitch.store.db`, so `Store(url)` creates these tables too,
on SQLite (WAL) and PostgreSQL alike. Every method is synchronous and meant to run in a worker thread
(`asyncio.to_thread`), one batch per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from softswitch.store.db import Store, metadata

#: Longest topic stored: the prefix, tenant, subject and type together (MQTT allows 65535 bytes, §1.5.3;
#: ours are far shorter: ids, user names and event types).
MAX_TOPIC_LENGTH = 1024
#: Longest subject key ("<kind>:<subject>").
MAX_SUBJECT_KEY_LENGTH = 512

outbox = sa.Table(
    "event_outbox",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("node", sa.String(128), nullable=False, index=True),
    sa.Column("subject_key", sa.String(MAX_SUBJECT_KEY_LENGTH), nullable=False),
    sa.Column("event_type", sa.String(128), nullable=False),
    sa.Column("topic", sa.String(MAX_TOPIC_LENGTH), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("retain", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

subjects = sa.Table(
    "event_subjects",
    metadata,
    sa.Column("node", sa.String(128), primary_key=True),
    sa.Column("subject_key", sa.String(MAX_SUBJECT_KEY_LENGTH), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    # JSON text of the subject's snapshot state (a device's contacts), or NULL.
    sa.Column("state", sa.Text, nullable=True),
    # When the subject ended (a conversation after `conversation.ended`), or NULL while it lives.
    sa.Column("ended_at", sa.Float, nullable=True),
)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One message waiting for its PUBACK. `payload` is the UTF-8 text published (empty: clear a retained
    message, MQTT 3.1.1 §3.3.1.3)."""

    subject_key: str
    event_type: str
    topic: str
    payload: str
    retain: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class SubjectState:
    """The persisted state of one subject: last `seq`, snapshot JSON, end time."""

    subject_key: str
    seq: int
    state: str | None
    ended_at: float | None


# The statements of the hot path, built once: building a statement costs more than running it on SQLite.
_INSERT_MESSAGES = outbox.insert().returning(outbox.c.id, sort_by_parameter_order=True)
_DELETE_MESSAGES = outbox.delete().where(
    (outbox.c.node == sa.bindparam("n")) & (outbox.c.id == sa.bindparam("i"))
)
_DELETE_SUBJECTS = subjects.delete().where(
    (subjects.c.node == sa.bindparam("n")) & (subjects.c.subject_key == sa.bindparam("k"))
)
_INSERT_SUBJECTS = subjects.insert()


class Outbox:
    """The outbox and counters of one node in a `Store`."""

    def __init__(self, store: Store, node: str) -> None:
        self.engine = store.engine
        self.node = node
        # A Store built before this module was imported lacks these tables (create_all skips existing ones).
        metadata.create_all(self.engine, tables=[outbox, subjects])

    def load_subjects(self) -> list[SubjectState]:
        """Every subject counter of this node (read once at start-up)."""
        query = sa.select(
            subjects.c.subject_key, subjects.c.seq, subjects.c.state, subjects.c.ended_at
        ).where(subjects.c.node == self.node)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [SubjectState(r.subject_key, r.seq, r.state, r.ended_at) for r in rows]

    def load_pending(self) -> list[tuple[int, OutboxMessage]]:
        """Messages not yet acknowledged, oldest first."""
        query = sa.select(outbox).where(outbox.c.node == self.node).order_by(outbox.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            (
                r.id,
                OutboxMessage(r.subject_key, r.event_type, r.topic, r.payload, bool(r.retain), r.created_at),
            )
            for r in rows
        ]

    def count(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(sa.func.count()).select_from(outbox).where(outbox.c.node == self.node)
            ).scalar_one()
        return int(value)

    def apply(
        self,
        messages: Sequence[OutboxMessage],
        acknowledged: Iterable[int],
        updated: Sequence[SubjectState],
        dropped: Iterable[str],
    ) -> list[int]:
        """One transaction: insert `messages` (returns their ids, in order), delete `acknowledged` ids,
        upsert the `updated` subject counters and delete the `dropped` subject keys."""
        ids: list[int] = []
        node = self.node
        acked = [{"n": node, "i": i} for i in acknowledged]
        gone = [{"n": node, "k": k} for k in dropped]
        with self.engine.begin() as conn:
            if messages:
                # One executemany; RETURNING in parameter order gives each message its id (SQLAlchemy
                # "insertmanyvalues": SQLite >= 3.35 and PostgreSQL both support RETURNING).
                result = conn.execute(
                    _INSERT_MESSAGES,
                    [
                        {
                            "node": self.node,
                            "subject_key": m.subject_key,
                            "event_type": m.event_type,
                            "topic": m.topic,
                            "payload": m.payload,
                            "retain": m.retain,
                            "created_at": m.created_at,
                        }
                        for m in messages
                    ],
                )
                ids = [int(row[0]) for row in result]
            if acked:
                conn.execute(_DELETE_MESSAGES, acked)
            keys = [{"n": node, "k": s.subject_key} for s in updated] + gone
            if keys:
                conn.execute(_DELETE_SUBJECTS, keys)
            if updated:
                conn.execute(
                    _INSERT_SUBJECTS,
                    [
                        {
                            "node": self.node,
                            "subject_key": s.subject_key,
                            "seq": s.seq,
                            "state": s.state,
                            "ended_at": s.ended_at,
                        }
                        for s in updated
                    ],
                )
        return ids
