"""The location store survives a restart: bindings written to SQLite on disk and read back."""

from __future__ import annotations

from pathlib import Path

from softswitch.sip.flow import Flow
from softswitch.sip.location import Binding, LocationService
from softswitch.store.db import BindingRow, Store


def make_binding(aor: str, port: int, expires_at: float) -> Binding:
    return Binding(
        aor=aor,
        contact=f"sip:{aor}@127.0.0.1:{port}",
        expires_at=expires_at,
        call_id=f"c{port}",
        cseq=3,
        flow=Flow("TCP", "127.0.0.1", port, 9),
        registered_at=100.0,
        instance="<urn:uuid:1>",
        reg_id="1",
        user_agent="baresip",
    )


def row(b: Binding) -> BindingRow:
    return BindingRow(b.aor, b.key, b.contact, b.expires_at, b.to_data())


def test_bindings_round_trip_through_a_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    store = Store(url)
    live, dead = make_binding("1001", 6000, 500.0), make_binding("1002", 6001, 150.0)
    store.apply_binding_changes([row(live), row(dead)], [])
    store.close()

    reopened = Store(url)
    rows, expired = reopened.load_and_expire_bindings(now=200.0)
    assert [r.aor for r in rows] == ["1001"]  # the expired one is gone…
    assert [r.aor for r in expired] == ["1002"]  # …and reported, once
    assert reopened.load_and_expire_bindings(now=200.0)[1] == []
    restored = Binding.from_data(rows[0].aor, rows[0].contact, rows[0].expires_at, rows[0].data)
    assert restored.contact == live.contact
    assert restored.key == live.key
    # The connection of a TCP flow does not survive a restart: only its address does.
    assert restored.flow == Flow("TCP", "127.0.0.1", 6000, None)
    assert restored.instance == "<urn:uuid:1>" and restored.user_agent == "baresip"
    reopened.apply_binding_changes([], [("1001", live.key)])
    assert reopened.load_bindings(now=200.0) == []
    reopened.close()


def test_upsert_replaces_the_same_key(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    b = make_binding("1001", 6000, 500.0)
    store.apply_binding_changes([row(b)], [])
    b2 = make_binding("1001", 6000, 900.0)
    store.apply_binding_changes([row(b2)], [])
    [r] = store.load_bindings(now=0.0)
    assert r.expires_at == 900.0
    store.close()


def test_location_expiry_heap_skips_refreshed_entries() -> None:
    loc = LocationService()
    b = make_binding("1001", 6000, 100.0)
    loc.put(b)
    loc.put(make_binding("1001", 6000, 300.0))  # refresh, same key
    assert loc.expire(150.0) == []
    assert loc.next_expiry() == 300.0
    [gone] = loc.expire(300.0)
    assert gone.expires_at == 300.0
    assert loc.bindings("1001") == []
    assert loc.find_by_contact(b.uri) is None
