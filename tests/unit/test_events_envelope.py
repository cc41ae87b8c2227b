"""The CloudEvents envelope, `seq` counters, topics and JSON Schemas of the events (EVENTS.md)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from softswitch.events.envelope import (
    Sequencer,
    build_envelope,
    event_data,
    format_time,
    subject_key,
)
from softswitch.events.mqtt import event_topic, registration_topic, topic_level
from softswitch.events.schemas import (
    REGISTRATION_SNAPSHOT,
    all_schemas,
    event_classes,
    registration_snapshot_schema,
    stale_schemas,
)
from softswitch.events.types import (
    AgentLoggedIn,
    AgentLoggedOut,
    AgentOffered,
    AgentOfferMissed,
    AgentStateChanged,
    AgentStats,
    CallAnswered,
    CallBridged,
    CallDequeued,
    CallDtmf,
    CallEnded,
    CallHeld,
    CallInitiated,
    CallMuted,
    CallQueued,
    CallRetrieved,
    CallRinging,
    CallUnbridged,
    CallUnmuted,
    CdrCreated,
    ConversationEnded,
    DeviceRegistered,
    DeviceUnregistered,
    Event,
    ParticipantJoined,
    ParticipantLeft,
    QueueStats,
    RecordingAvailable,
    RecordingStarted,
    RecordingStopped,
    SupervisionEnded,
    SupervisionModeChanged,
    SupervisionStarted,
    TransferAnswered,
    TransferCancelled,
    TransferCompleted,
    TransferFailed,
    TransferInitiated,
)

pytestmark = pytest.mark.timeout(60)

DOCS_EVENTS = Path(__file__).resolve().parents[2] / "docs" / "events"
NOW = 1795342503.482  # 2026-11-22T10:15:03.482Z

LEG: dict[str, Any] = {
    "conversation_id": "CV8d0c",
    "call_id": "CA01",
    "sip_call_id": "abc@127.0.0.1",
    "direction": "inbound",
    "from_": "1001",
    "to": "1002",
    "role": "caller",
    "user_data": None,
}


def sample_events() -> list[Event]:
    """One instance of every event type, with non-default values where a field has one."""
    return [
        DeviceRegistered("1001", "sip:1001@127.0.0.1:5070", "udp", 300, "baresip", "127.0.0.1:5070"),
        DeviceUnregistered("1001", "sip:1001@127.0.0.1:5070", "udp", "expired"),
        CallInitiated(**LEG, user="1001"),
        CallRinging(
            **{**LEG, "call_id": "CA02", "role": "callee", "direction": "outbound"}, early_media=True
        ),
        CallAnswered(**LEG, answered_by="1002"),
        CallBridged(**LEG, peer_call_id="CA02"),
        CallUnbridged(**{**LEG, "user_data": "order-42"}, peer_call_id="CA02"),
        CallDtmf(**LEG, digit="5", duration_ms=160, method="info"),
        CallHeld(**LEG, by="api"),
        TransferInitiated("CV8d0c", "TR1", "blind", "CA01", "CA02", None, {"kind": "queue", "id": "support"}),
        TransferCompleted("CV8d0c", "TR1", "blind", "CA01", "CA02", "CA03", {"kind": "user", "id": "1004"}),
        CallRetrieved(**LEG, by="remote"),
        CallMuted(**LEG),
        CallUnmuted(**LEG),
        TransferAnswered("CV8d0c", "TR2", "attended", "CA01", "CA02", "CA04", {"kind": "user", "id": "1004"}),
        TransferCancelled(
            "CV8d0c", "TR2", "attended", "CA01", "CA02", "CA04", {"kind": "user", "id": "1004"}
        ),
        TransferFailed(
            "CV8d0c", "TR3", "attended", "CA01", "CA02", "CA05", {"kind": "user", "id": "1004"}, reason="busy"
        ),
        ParticipantJoined("CV8d0c", "CA04", room="CV8d0c", role="consult", reason="conference"),
        ParticipantLeft("CV8d0c", "CA02", room="CV8d0c", role="agent", reason="left"),
        SupervisionStarted("CV8d0c", "8002", "CA06", "CA02", "listen"),
        SupervisionModeChanged("CV8d0c", "8002", "CA06", "CA02", "barge", previous_mode="whisper"),
        SupervisionEnded("CV8d0c", "8002", "CA06", "CA02", "barge"),
        RecordingStarted("CV8d0c", "RE1", "recordings/CV8d0c/RE1.wav"),
        RecordingStopped("CV8d0c", "RE1", "recordings/CV8d0c/RE1.wav", 12.5),
        RecordingAvailable("CV8d0c", "RE1", "recordings/CV8d0c/RE1.wav", 12.5, size_bytes=200_044),
        CallEnded(
            **LEG,
            final_status="busy",
            released_by="remote",
            sip_code=486,
            cause="Busy Here",
            ring_s=1.5,
            talk_s=0.0,
            hold_s=0.0,
        ),
        ConversationEnded("CV8d0c", ("CA01", "CA02"), 12.25, "completed"),
        CdrCreated("CV8d0c", {"byeType": 1, "cdrs": [{"call_id": "CA01", "talk_s": 10.0}]}),
        CallQueued(**LEG, queue_id="support", position=2, wait_s=0.0, reason="transfer"),
        CallDequeued(**LEG, queue_id="support", position=1, wait_s=12.5, reason="timeout"),
        AgentLoggedIn("8001", {"kind": "sip", "address": "1001"}, None),
        AgentLoggedOut("8001", {"kind": "pstn", "address": "+8613800000000"}, "9001"),
        AgentStateChanged(
            "8001", "wrap_up", "busy", None, format_time(NOW), format_time(NOW + 10), ("support", "sales")
        ),
        AgentOffered("8001", "CV8d0c", "support"),
        AgentOfferMissed("8001", "CV8d0c", "support", True),
        AgentStats("8001", 3, 2, 136.5),
        QueueStats("support", 2, 31.5, 1, 3, 40, 2, 95.2),
    ]


def validator(type_name: str) -> jsonschema.protocols.Validator:
    schema = dict(all_schemas())[type_name]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def envelope_of(event: Event, seq: int = 1) -> dict[str, Any]:
    envelope = build_envelope(event, node="node-1", tenant="default", seq=seq, now=NOW)
    # What goes on the wire: JSON text and back.
    decoded: dict[str, Any] = json.loads(json.dumps(envelope))
    return decoded


# -- envelope ---------------------------------------------------------------------------------------


def test_envelope_fields() -> None:
    event = CallAnswered(**LEG, answered_by="1002")
    env = envelope_of(event, seq=4)
    assert env["specversion"] == "1.0"
    assert re.fullmatch(r"[0-9a-f]{32}", env["id"])
    assert env["source"] == "softswitch://node-1"
    assert env["type"] == "call.answered"
    assert env["time"] == "2026-11-22T10:15:03.482Z"
    assert env["datacontenttype"] == "application/json"
    assert env["subject"] == "CV8d0c"
    assert env["tenant"] == "default"
    assert env["seq"] == 4
    assert env["data"]["from"] == "1001"
    assert "from_" not in env["data"]
    assert env["data"]["answered_by"] == "1002"
    assert set(env["data"]) == {f.name.rstrip("_") for f in dataclasses.fields(event)}


def test_ids_are_unique() -> None:
    event = CallBridged(**LEG, peer_call_id="CA02")
    ids = {envelope_of(event)["id"] for _ in range(1000)}
    assert len(ids) == 1000


def test_tuples_become_arrays() -> None:
    data = event_data(ConversationEnded("CV1", ("CA01", "CA02"), 3.0, "completed"))
    assert data["legs"] == ["CA01", "CA02"]


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (NOW, "2026-11-22T10:15:03.482Z"),
        (1.9996, "1970-01-01T00:00:02.000Z"),  # rounds into the next second, not ".1000"
        (59.0004, "1970-01-01T00:00:59.000Z"),
    ],
)
def test_time_is_utc_with_milliseconds(timestamp: float, text: str) -> None:
    assert format_time(timestamp) == text


def test_subject_keys_separate_kinds() -> None:
    device = DeviceUnregistered("CV1", "sip:x@127.0.0.1", "udp", "expired")
    call = CallAnswered(**{**LEG, "conversation_id": "CV1"})
    assert subject_key(device) == "device:CV1"
    assert subject_key(call) == "conversation:CV1"


@given(
    st.lists(st.sampled_from(["conversation:A", "conversation:B", "device:1001", "agent:7"]), max_size=200)
)
def test_seq_is_gap_free_per_subject(keys: list[str]) -> None:
    sequencer = Sequencer()
    seen: dict[str, list[int]] = {}
    for key in keys:
        seen.setdefault(key, []).append(sequencer.next(key))
    for numbers in seen.values():
        assert numbers == list(range(1, len(numbers) + 1))


def test_seq_continues_after_restore_and_restarts_after_drop() -> None:
    sequencer = Sequencer([("device:1001", 41)])
    assert sequencer.next("device:1001") == 42
    sequencer.drop("device:1001")
    assert sequencer.next("device:1001") == 1
    assert sequencer.last("device:1001") == 1


# -- topics -----------------------------------------------------------------------------------------


def test_topics_follow_events_md() -> None:
    p, t = "softswitch/v1", "default"
    assert event_topic(p, t, CallRinging(**LEG)) == "softswitch/v1/default/calls/CV8d0c/call.ringing"
    conv_end = ConversationEnded("CV8d0c", (), 1.0, "completed")
    assert event_topic(p, t, conv_end) == "softswitch/v1/default/calls/CV8d0c/conversation.ended"
    reg = DeviceRegistered("1001", "sip:1001@127.0.0.1", "udp", 60, "ua", "127.0.0.1:5070")
    assert event_topic(p, t, reg) == "softswitch/v1/default/devices/1001/device.registered"
    assert event_topic(p, t, CdrCreated("CV8d0c", {})) == "softswitch/v1/default/cdr/CV8d0c"
    assert registration_topic(p, t, "1001") == "softswitch/v1/default/devices/1001/registration"


def test_topic_levels_cannot_escape_their_level() -> None:
    assert topic_level("a/b+c#d%e") == "a%2Fb%2Bc%23d%25e"
    assert topic_level("") == "%00"
    reg = DeviceUnregistered("x/#", "sip:x@127.0.0.1", "udp", "expired")
    assert event_topic("p", "t", reg) == "p/t/devices/x%2F%23/device.unregistered"


# -- schemas ----------------------------------------------------------------------------------------


def test_every_event_type_has_a_sample() -> None:
    assert sorted(e.type for e in sample_events()) == [c.type for c in event_classes()]


@pytest.mark.parametrize("event", sample_events(), ids=lambda e: e.type)
def test_every_event_type_validates_against_its_schema(event: Event) -> None:
    validator(event.type).validate(envelope_of(event, seq=3))


def test_schema_enums_reject_undocumented_values() -> None:
    env = envelope_of(CallEnded(**LEG, final_status="completed"))
    check = validator("call.ended")
    check.validate(env)
    for field, bad in [("final_status", "hungup"), ("released_by", "nobody"), ("role", "boss")]:
        broken = json.loads(json.dumps(env))
        broken["data"][field] = bad
        with pytest.raises(jsonschema.ValidationError):
            check.validate(broken)
    direction = json.loads(json.dumps(env))
    direction["data"]["direction"] = "sideways"
    with pytest.raises(jsonschema.ValidationError):
        check.validate(direction)


def test_schemas_reject_missing_extra_and_mistyped_fields() -> None:
    env = envelope_of(CallRinging(**LEG, early_media=True))
    check = validator("call.ringing")
    missing = json.loads(json.dumps(env))
    del missing["data"]["sip_call_id"]
    extra = json.loads(json.dumps(env))
    extra["data"]["surprise"] = 1
    mistyped = json.loads(json.dumps(env))
    mistyped["data"]["early_media"] = "yes"
    wrong_type = json.loads(json.dumps(env))
    wrong_type["type"] = "call.answered"
    no_seq = json.loads(json.dumps(env))
    no_seq["seq"] = 0
    bad_time = json.loads(json.dumps(env))
    bad_time["time"] = "2026-11-22T10:15:03Z"
    for broken in (missing, extra, mistyped, wrong_type, no_seq, bad_time):
        with pytest.raises(jsonschema.ValidationError):
            check.validate(broken)


def test_registration_snapshot_schema() -> None:
    schema = registration_snapshot_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    snapshot = {
        "type": REGISTRATION_SNAPSHOT,
        "source": "softswitch://node-1",
        "tenant": "default",
        "user": "1001",
        "time": format_time(NOW),
        "seq": 2,
        "contacts": [
            {
                "contact": "sip:1001@127.0.0.1:5070",
                "transport": "udp",
                "expires": 300,
                "registered_at": format_time(NOW),
                "user_agent": "baresip",
                "source": "127.0.0.1:5070",
            }
        ],
    }
    jsonschema.Draft202012Validator(schema).validate(snapshot)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({**snapshot, "contacts": []})


def test_shipped_schema_files_are_current() -> None:
    assert stale_schemas(DOCS_EVENTS) == [], "run: python -m softswitch.events.schemas --write docs/events"
