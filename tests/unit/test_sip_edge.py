"""The edge core (registrar, digest auth, stateful proxy) driven with bytes and a fake clock."""

from __future__ import annotations

import pytest

from softswitch.events.types import DeviceRegistered, DeviceUnregistered
from softswitch.metrics import Metrics
from softswitch.sip import proxy
from softswitch.sip.edge import EdgeCore, EdgeSettings
from softswitch.sip.errors import SipError
from softswitch.sip.flow import Flow
from softswitch.sip.location import LocationService
from softswitch.sip.message import SipRequest, SipResponse
from softswitch.sip.parser import parse_message
from softswitch.sip.registrar import RegistrarPolicy

from .siputil import authorization, parse_request, request_bytes, response_bytes

EDGE = "127.0.0.1:5060"
PHONE1 = Flow("UDP", "127.0.0.1", 5071)
PHONE2 = Flow("UDP", "127.0.0.1", 5072)
PHONE2B = Flow("TCP", "127.0.0.1", 40111, 7)


class Harness:
    def __init__(self, **settings: object) -> None:
        base: dict[str, object] = dict(
            host="127.0.0.1",
            port=5060,
            domain="127.0.0.1",
            aliases=frozenset({"127.0.0.1"}),
            realm="127.0.0.1",
            secret=b"k" * 32,
            policy=RegistrarPolicy(min_expires=60, max_expires=3600, default_expires=600),
            auth_max_failures=3,
        )
        base.update(settings)
        self.core = EdgeCore(
            EdgeSettings(**base),  # type: ignore[arg-type]
            {"1001": "pw1001", "1002": "pw1002", "1003": "pw1003"},
            LocationService(),
            Metrics(),
        )
        self.now = 1000.0

    def send(self, data: bytes, flow: Flow) -> list[tuple[SipRequest | SipResponse, Flow]]:
        self.core.outbox.clear()
        self.core.receive(data, flow, self.now)
        return self.take()

    def take(self) -> list[tuple[SipRequest | SipResponse, Flow]]:
        out = [(parse_message(s.data), s.flow) for s in self.core.outbox]
        self.core.outbox.clear()
        return out

    def tick(self, seconds: float) -> list[tuple[SipRequest | SipResponse, Flow]]:
        end = self.now + seconds
        while (at := self.core.next_timer()) is not None and at <= end:
            self.now = at
            self.core.handle_timers(at)
        self.now = end
        return self.take()

    def register(
        self,
        user: str,
        flow: Flow,
        *,
        contact: str | None = None,
        expires: int = 600,
        password: str | None = None,
        extra: str = "",
        call_id: str | None = None,
    ) -> SipResponse:
        contact = contact or f"<sip:{user}@{flow.host}:{flow.port}>"
        call_id = call_id or f"reg-{user}-{flow.port}"
        first = request_bytes(
            "REGISTER",
            "sip:127.0.0.1",
            from_user=user,
            to_uri=f"sip:{user}@127.0.0.1",
            contact=contact,
            call_id=call_id,
            cseq=1,
            via_host=f"{flow.host}:{flow.port}",
            transport=flow.transport,
            extra=f"Expires: {expires}\n{extra}",
        )
        [(challenge, _)] = self.send(first, flow)
        assert isinstance(challenge, SipResponse) and challenge.status == 401
        auth = authorization(
            challenge, method="REGISTER", uri="sip:127.0.0.1", user=user, password=password or f"pw{user}"
        )
        second = request_bytes(
            "REGISTER",
            "sip:127.0.0.1",
            from_user=user,
            to_uri=f"sip:{user}@127.0.0.1",
            contact=contact,
            call_id=call_id,
            cseq=2,
            via_host=f"{flow.host}:{flow.port}",
            transport=flow.transport,
            extra=f"Expires: {expires}\n{auth}\n{extra}",
        )
        [(final, _)] = self.send(second, flow)
        assert isinstance(final, SipResponse)
        return final

    def invite(
        self, caller: str, callee: str, flow: Flow, *, extra: str = ""
    ) -> list[tuple[SipRequest | SipResponse, Flow]]:
        uri = f"sip:{callee}@127.0.0.1"
        call_id = f"inv-{caller}-{callee}-{self.now}"
        first = request_bytes(
            "INVITE",
            uri,
            from_user=caller,
            call_id=call_id,
            via_host=f"{flow.host}:{flow.port}",
            contact=f"<sip:{caller}@127.0.0.1:{flow.port}>",
            extra=extra,
        )
        [(challenge, _)] = self.send(first, flow)
        assert isinstance(challenge, SipResponse) and challenge.status == 407
        ack = request_bytes(
            "ACK",
            uri,
            from_user=caller,
            call_id=call_id,
            branch=challenge.top_via.branch,
            to_tag=challenge.to.tag,
            contact=None,
            via_host=f"{flow.host}:{flow.port}",
        )
        assert self.send(ack, flow) == []  # absorbed by the transaction
        auth = authorization(
            challenge, method="INVITE", uri=uri, user=caller, password=f"pw{caller}", proxy=True
        )
        second = request_bytes(
            "INVITE",
            uri,
            from_user=caller,
            call_id=call_id,
            cseq=2,
            via_host=f"{flow.host}:{flow.port}",
            contact=f"<sip:{caller}@127.0.0.1:{flow.port}>",
            extra=f"{auth}\n{extra}",
        )
        return self.send(second, flow)


def statuses(out: list[tuple[SipRequest | SipResponse, Flow]]) -> list[int | str]:
    return [m.status if isinstance(m, SipResponse) else m.method for m, _ in out]


def test_options_to_the_edge_is_answered() -> None:
    h = Harness()
    [(resp, flow)] = h.send(request_bytes("OPTIONS", f"sip:{EDGE}", contact=None), PHONE1)
    assert isinstance(resp, SipResponse) and resp.status == 200
    assert "REGISTER" in (resp.get("Allow") or "")
    assert flow == PHONE1


def test_register_challenge_offers_sha256_and_md5_then_binds() -> None:
    h = Harness(digest_algorithms=("SHA-256", "MD5"))
    first = request_bytes(
        "REGISTER",
        "sip:127.0.0.1",
        to_uri="sip:1001@127.0.0.1",
        via_host="127.0.0.1:5071",
        extra="Expires: 600",
    )
    [(challenge, _)] = h.send(first, PHONE1)
    assert isinstance(challenge, SipResponse) and challenge.status == 401
    algorithms = [v.split("algorithm=")[1].split(",")[0] for v in challenge.get_all("WWW-Authenticate")]
    assert algorithms == ["SHA-256", "MD5"]
    final = h.register("1001", PHONE1)
    assert final.status == 200
    [contact] = final.get_all("Contact")
    assert "sip:1001@127.0.0.1:5071" in contact and "expires=600" in contact
    assert [type(e) for e in h.core.events] == [DeviceRegistered]
    assert h.core.events[0].user == "1001"
    assert [k for k, _ in h.core.binding_changes] == ["upsert"]


def test_register_with_sha256_works_too() -> None:
    h = Harness(digest_algorithms=("SHA-256", "MD5"))
    first = request_bytes(
        "REGISTER",
        "sip:127.0.0.1",
        to_uri="sip:1002@127.0.0.1",
        from_user="1002",
        via_host="127.0.0.1:5072",
        extra="Expires: 600",
    )
    [(challenge, _)] = h.send(first, PHONE2)
    assert isinstance(challenge, SipResponse)
    auth = authorization(
        challenge, method="REGISTER", uri="sip:127.0.0.1", user="1002", password="pw1002", algorithm="SHA-256"
    )
    second = request_bytes(
        "REGISTER",
        "sip:127.0.0.1",
        to_uri="sip:1002@127.0.0.1",
        from_user="1002",
        via_host="127.0.0.1:5072",
        extra=f"Expires: 600\n{auth}",
        cseq=2,
    )
    [(final, _)] = h.send(second, PHONE2)
    assert isinstance(final, SipResponse) and final.status == 200


def test_wrong_password_is_rechallenged_then_blocked_with_403() -> None:
    h = Harness()
    answers = [h.register("1001", PHONE1, password="nope").status for _ in range(3)]
    assert answers == [401, 401, 403]
    # Blocked now: even the right password is refused until the block ends.
    first = request_bytes("REGISTER", "sip:127.0.0.1", to_uri="sip:1001@127.0.0.1", extra="Expires: 600")
    [(resp, _)] = h.send(first, PHONE1)
    assert isinstance(resp, SipResponse) and resp.status == 403
    h.now += 61
    assert h.register("1001", PHONE1).status == 200


def test_unknown_user_gets_the_same_answer_as_a_wrong_password() -> None:
    h = Harness()
    assert h.register("1999", PHONE1, password="x").status == 401


def test_interval_too_brief_names_min_expires() -> None:
    h = Harness()
    resp = h.register("1001", PHONE1, expires=10)
    assert resp.status == 423
    assert resp.get("Min-Expires") == "60"


def test_expires_is_capped_and_bindings_expire_on_the_timer() -> None:
    h = Harness()
    resp = h.register("1001", PHONE1, expires=99999)
    assert "expires=3600" in resp.get_all("Contact")[0]
    h.core.events.clear()
    h.tick(3599)
    assert h.core.location.bindings("1001")
    h.tick(2)
    assert not h.core.location.bindings("1001")
    assert [(type(e), e.reason) for e in h.core.events] == [(DeviceUnregistered, "expired")]


def test_star_unregisters_every_binding() -> None:
    h = Harness()
    h.register("1001", PHONE1, call_id="a")
    h.register("1001", Flow("UDP", "127.0.0.1", 5081), call_id="b")
    assert len(h.core.location.bindings("1001")) == 2
    resp = h.register("1001", PHONE1, contact="*", expires=0, call_id="c")
    assert resp.status == 200
    assert resp.get_all("Contact") == []
    assert not h.core.location.bindings("1001")


def test_star_without_expires_zero_is_rejected() -> None:
    h = Harness()
    assert h.register("1001", PHONE1, contact="*", expires=60).status == 400


def test_same_instance_replaces_the_old_contact() -> None:
    h = Harness()
    inst = ';+sip.instance="<urn:uuid:00000000-0000-0000-0000-000000000001>";reg-id=1'
    h.register("1001", PHONE1, contact=f"<sip:1001@127.0.0.1:5071>{inst}", call_id="x")
    h.register(
        "1001", Flow("UDP", "127.0.0.1", 5099), contact=f"<sip:1001@127.0.0.1:5099>{inst}", call_id="y"
    )
    [binding] = h.core.location.bindings("1001")
    assert binding.contact == "sip:1001@127.0.0.1:5099"
    assert binding.instance == "<urn:uuid:00000000-0000-0000-0000-000000000001>"


def test_fetching_bindings_without_contact() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    resp = h.register("1001", PHONE1, contact="", call_id="q")
    assert resp.status == 200 and len(resp.get_all("Contact")) == 1


def test_call_is_challenged_forwarded_over_the_registered_flow_and_routed_in_dialog() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2B)
    out = h.invite(
        "1001", "1002", PHONE1, extra="X-Softswitch-Identity: 1003\nP-Asserted-Identity: <sip:1003@x>"
    )
    assert statuses(out) == [100, "INVITE"]
    trying, to_phone = out
    assert trying[1] == PHONE1
    fwd, flow = to_phone
    assert isinstance(fwd, SipRequest)
    assert flow == PHONE2B  # over the TCP connection 1002 registered on
    assert str(fwd.uri) == "sip:1002@127.0.0.1:40111"
    assert fwd.max_forwards == 69
    assert fwd.top_via.host == "127.0.0.1" and fwd.top_via.port == 5060
    assert fwd.top_via.transport == "TCP"
    assert fwd.vias[1].param("received") == "127.0.0.1" and fwd.vias[1].param("rport") == "5071"
    [rr] = fwd.get_all("Record-Route")
    assert rr.startswith("<sip:127.0.0.1:5060;transport=tcp;lr;ft=")
    assert fwd.get("X-Softswitch-Identity") is None
    assert fwd.get_all("P-Asserted-Identity") == ["<sip:1001@127.0.0.1>"]

    ringing = response_bytes(fwd, 180, "Ringing", to_tag="callee")
    [(r180, f180)] = h.send(ringing, PHONE2B)
    assert isinstance(r180, SipResponse) and r180.status == 180 and f180 == PHONE1
    assert len(r180.vias) == 1  # our Via removed
    [caller_rr] = r180.get_all("Record-Route")
    assert caller_rr.startswith("<sip:127.0.0.1:5060;lr;ft=") and "." in caller_rr  # UDP, two flows

    [(r200, _)] = h.send(response_bytes(fwd, 200, "OK", to_tag="callee"), PHONE2B)
    assert isinstance(r200, SipResponse) and r200.status == 200
    # Retransmitted 200 (RFC 6026): still forwarded.
    assert statuses(h.send(response_bytes(fwd, 200, "OK", to_tag="callee"), PHONE2B)) == [200]

    route = caller_rr.split(";ft=")[0] + ";ft=" + caller_rr.split(";ft=")[1]
    ack = request_bytes(
        "ACK",
        "sip:1002@127.0.0.1:40111",
        call_id=fwd.call_id,
        cseq=2,
        to_tag="callee",
        contact=None,
        via_host="127.0.0.1:5071",
        extra=f"Route: {route}",
        to_uri="sip:1002@127.0.0.1",
    )
    [(fack, fack_flow)] = h.send(ack, PHONE1)
    assert isinstance(fack, SipRequest) and fack.method == "ACK" and fack_flow == PHONE2B
    assert fack.get_all("Route") == []

    # BYE from the callee, with the route set the callee learned from the INVITE.
    bye = request_bytes(
        "BYE",
        "sip:1001@127.0.0.1:5071",
        from_user="1002",
        call_id=fwd.call_id,
        to_uri="sip:1001@127.0.0.1",
        to_tag="from1001",
        contact=None,
        via_host="127.0.0.1:40111",
        transport="TCP",
        extra=f"Route: {rr}",
    )
    [(fbye, fbye_flow)] = h.send(bye, PHONE2B)
    assert isinstance(fbye, SipRequest) and fbye.method == "BYE" and fbye_flow == PHONE1
    [(r, f)] = h.send(response_bytes(fbye, 200, "OK"), PHONE1)
    assert isinstance(r, SipResponse) and r.status == 200 and f.conn_id == 7


def test_unknown_user_is_404_and_unregistered_user_is_480() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    assert statuses(h.invite("1001", "1999", PHONE1)) == [404]
    assert statuses(h.invite("1001", "1003", PHONE1)) == [480]


def test_from_must_match_the_authenticated_user() -> None:
    h = Harness()
    uri = "sip:1002@127.0.0.1"
    [(challenge, _)] = h.send(request_bytes("INVITE", uri, from_user="1003", call_id="spoof"), PHONE1)
    assert isinstance(challenge, SipResponse)
    auth = authorization(challenge, method="INVITE", uri=uri, user="1001", password="pw1001", proxy=True)
    out = h.send(request_bytes("INVITE", uri, from_user="1003", call_id="spoof", cseq=2, extra=auth), PHONE1)
    assert statuses(out) == [403]


def test_cancel_before_and_after_provisional() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2)
    out = h.invite("1001", "1002", PHONE1)
    fwd = out[1][0]
    assert isinstance(fwd, SipRequest)
    caller_invite = request_bytes(
        "INVITE", "sip:1002@127.0.0.1", call_id=fwd.call_id, cseq=2, via_host="127.0.0.1:5071"
    )
    original = parse_request(caller_invite)
    # The CANCEL must carry the branch of the INVITE the caller sent.
    branch = fwd.vias[1].branch
    cancel = request_bytes(
        "CANCEL",
        "sip:1002@127.0.0.1",
        call_id=fwd.call_id,
        cseq=2,
        branch=branch,
        contact=None,
        via_host="127.0.0.1:5071",
    )
    assert statuses(h.send(cancel, PHONE1)) == [200]  # nothing sent downstream before a provisional
    out = h.send(response_bytes(fwd, 180, "Ringing", to_tag="c"), PHONE2)
    assert statuses(out) == ["CANCEL"]  # sent once the branch is proceeding (RFC 3261 §9.1)
    fcancel = out[0][0]
    assert isinstance(fcancel, SipRequest)
    assert fcancel.top_via.branch == fwd.top_via.branch
    h.send(response_bytes(fcancel, 200, "OK", to_tag="c"), PHONE2)
    out = h.send(response_bytes(fwd, 487, "Request Terminated", to_tag="c"), PHONE2)
    assert statuses(out) == ["ACK", 487]
    assert out[1][1] == PHONE1
    assert original.call_id == fwd.call_id


def test_unmatched_cancel_is_481() -> None:
    h = Harness()
    cancel = request_bytes("CANCEL", "sip:1002@127.0.0.1", contact=None)
    assert statuses(h.send(cancel, PHONE1)) == [481]


def test_parallel_fork_cancels_the_losing_branch() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2, call_id="b1")
    h.register("1002", PHONE2B, call_id="b2")
    out = h.invite("1001", "1002", PHONE1)
    assert statuses(out) == [100, "INVITE", "INVITE"]
    (a, fa), (b, fb) = out[1], out[2]
    assert {fa, fb} == {PHONE2, PHONE2B}
    assert isinstance(a, SipRequest) and isinstance(b, SipRequest)
    assert a.top_via.branch != b.top_via.branch
    h.send(response_bytes(b, 180, "Ringing", to_tag="bb"), fb)
    out = h.send(response_bytes(a, 200, "OK", to_tag="aa"), fa)
    assert statuses(out) == [200, "CANCEL"]
    cancel = out[1][0]
    assert isinstance(cancel, SipRequest)
    assert cancel.get("Reason") and "200" in (cancel.get("Reason") or "")
    assert out[1][1] == fb


def test_best_response_when_every_branch_fails() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2, call_id="b1")
    h.register("1002", PHONE2B, call_id="b2")
    out = h.invite("1001", "1002", PHONE1)
    (a, fa), (b, fb) = out[1], out[2]
    assert isinstance(a, SipRequest) and isinstance(b, SipRequest)
    assert statuses(h.send(response_bytes(a, 486, "Busy Here", to_tag="x"), fa)) == ["ACK"]
    assert statuses(h.send(response_bytes(b, 503, "Service Unavailable", to_tag="y"), fb)) == ["ACK", 486]


def test_503_from_downstream_becomes_500() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2)
    out = h.invite("1001", "1002", PHONE1)
    fwd = out[1][0]
    assert isinstance(fwd, SipRequest)
    assert statuses(h.send(response_bytes(fwd, 503, "Service Unavailable", to_tag="y"), PHONE2)) == [
        "ACK",
        500,
    ]


def test_unanswered_branch_times_out_with_408() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2)
    h.invite("1001", "1002", PHONE1)
    out = h.tick(40)
    assert 408 in statuses(out)


def test_max_forwards_zero_is_483_and_proxy_require_420() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    data = request_bytes("INVITE", "sip:1002@127.0.0.1").replace(b"Max-Forwards: 70", b"Max-Forwards: 0")
    assert statuses(h.send(data, PHONE1)) == [483]
    data = request_bytes("INVITE", "sip:1002@127.0.0.1", extra="Proxy-Require: foo")
    [(resp, _)] = h.send(data, PHONE1)
    assert isinstance(resp, SipResponse) and resp.status == 420 and resp.get("Unsupported") == "foo"


def test_looped_request_is_482() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2)
    out = h.invite("1001", "1002", PHONE1)
    fwd = out[1][0]
    assert isinstance(fwd, SipRequest)
    # The same request comes back to us (e.g. a phone forwarding to us): our Via is in it.
    fwd.uri = parse_request(request_bytes("INVITE", "sip:1002@127.0.0.1")).uri
    fwd.remove("Record-Route")
    again = fwd.to_bytes()
    resp = h.send(again, PHONE2)
    assert 482 in statuses(resp)


def test_in_dialog_request_with_a_forged_token_is_not_relayed() -> None:
    h = Harness()
    route = "<sip:127.0.0.1:5060;lr;ft=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA>"
    bye = request_bytes("BYE", "sip:victim@127.0.0.1:9999", to_tag="t", contact=None, extra=f"Route: {route}")
    out = h.send(bye, PHONE1)
    assert statuses(out) == [404]


def test_route_to_a_foreign_host_is_refused() -> None:
    h = Harness()
    bye = request_bytes(
        "BYE", "sip:x@127.0.0.1:9999", to_tag="t", contact=None, extra="Route: <sip:127.0.0.2:5060;lr>"
    )
    assert statuses(h.send(bye, PHONE1)) == [403]


def test_out_of_dialog_bye_is_481() -> None:
    h = Harness()
    assert statuses(h.send(request_bytes("BYE", "sip:1002@127.0.0.1", contact=None), PHONE1)) == [481]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            b"INVITE sip:1002@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bKx\r\n"
            b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>\r\nCSeq: 1 INVITE\r\n"
            b"Content-Length: 0\r\n\r\n",
            "call-id",
        ),
        (
            b"INVITE sip:1002@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bKx\r\n"
            b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:b@127.0.0.1>\r\nCall-ID: x\r\nCSeq: one INVITE\r\n"
            b"Content-Length: 0\r\n\r\n",
            "cseq",
        ),
    ],
)
def test_malformed_request_with_readable_via_gets_400_naming_the_problem(data: bytes, reason: str) -> None:
    h = Harness()
    h.core.receive(data, PHONE1, h.now)
    [send] = h.core.outbox
    status_line = send.data.split(b"\r\n")[0].decode()
    assert status_line.startswith("SIP/2.0 400 ")
    assert reason in status_line.lower()
    assert send.flow == PHONE1


def test_garbage_is_dropped() -> None:
    h = Harness()
    assert h.send(b"\x00\xff garbage", PHONE1) == []
    assert h.send(b"INVITE sip:x SIP/2.0\r\n\r\n", PHONE1) == []


def test_default_challenge_is_md5_only_for_deployed_phones() -> None:
    # baresip 1.0.0 fails on any SHA-256 challenge and SIPp 3.6.1 reads only the first one.
    h = Harness()
    first = request_bytes("REGISTER", "sip:127.0.0.1", to_uri="sip:1001@127.0.0.1", extra="Expires: 600")
    [(challenge, _)] = h.send(first, PHONE1)
    assert isinstance(challenge, SipResponse)
    [value] = challenge.get_all("WWW-Authenticate")
    assert "algorithm=MD5" in value and 'qop="auth"' in value


def test_unreachable_device_fails_the_branch_at_once_with_480() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2B)
    out = h.invite("1001", "1002", PHONE1)
    assert statuses(out) == [100, "INVITE"]
    h.core.flow_failed(Flow("TCP", PHONE2B.host, PHONE2B.port), h.now)
    [(resp, flow)] = h.take()
    assert isinstance(resp, SipResponse) and resp.status == 480 and flow == PHONE1
    assert "unreachable" in resp.reason


WORKER = Flow("UDP", "127.0.0.1", 5090)


def media_harness(**settings: object) -> tuple[Harness, list[Flow | None]]:
    h = Harness(**settings)
    choice: list[Flow | None] = [WORKER]
    h.core.media_dispatch = lambda: choice[0]
    h.core.trusted = lambda flow: flow == WORKER
    return h, choice


def test_calls_from_phones_go_to_a_media_worker_with_the_authenticated_identity() -> None:
    h, _ = media_harness()
    h.register("1001", PHONE1)
    out = h.invite("1001", "1002", PHONE1, extra="X-Softswitch-Identity: 1004")
    assert statuses(out) == [100, "INVITE"]
    fwd, flow = out[1]
    assert isinstance(fwd, SipRequest) and flow == WORKER
    assert str(fwd.uri) == "sip:1002@127.0.0.1"  # the worker sees the dialed number
    assert fwd.get_all("X-Softswitch-Identity") == ["1001"]  # ours, not the phone's
    assert fwd.get_all("Record-Route")


def test_worker_originated_calls_reach_the_user_without_a_challenge() -> None:
    h, _ = media_harness()
    h.register("1002", PHONE2)
    invite = request_bytes(
        "INVITE", "sip:1002@127.0.0.1", from_user="1001", via_host="127.0.0.1:5090",
        contact="<sip:1001@127.0.0.1:5090>", extra="Route: <sip:127.0.0.1:5060;lr>",
    )  # fmt: skip
    out = h.send(invite, WORKER)
    assert statuses(out) == [100, "INVITE"]
    fwd, flow = out[1]
    assert isinstance(fwd, SipRequest) and flow == PHONE2
    assert fwd.get("X-Softswitch-Identity") is None


def test_admission_refuses_by_rate_and_by_capacity_with_503() -> None:
    h, choice = media_harness(max_cps=2.0)
    h.register("1001", PHONE1)
    assert [statuses(h.invite("1001", "1002", PHONE1))[-1] for _ in range(2)] == ["INVITE", "INVITE"]
    # The bucket (a burst of two) is empty: the next call is refused before any challenge round.
    shed = request_bytes("INVITE", "sip:1002@127.0.0.1", call_id="shed")
    [(resp, _)] = h.send(shed, PHONE1)
    assert isinstance(resp, SipResponse) and resp.status == 503 and resp.get("Retry-After") == "1"
    h.now += 1.0
    choice[0] = None  # every worker full
    [(resp, _)] = [(m, f) for m, f in h.invite("1001", "1002", PHONE1)]
    assert isinstance(resp, SipResponse) and resp.status == 503 and resp.get("Retry-After") == "5"
    assert "capacity" in resp.reason


def test_a_workers_503_reaches_the_caller_unchanged() -> None:
    h, _ = media_harness()
    h.register("1001", PHONE1)
    out = h.invite("1001", "1002", PHONE1)
    to_worker = out[1][0]
    assert isinstance(to_worker, SipRequest)
    out = h.send(
        response_bytes(to_worker, 503, "Service Unavailable", to_tag="w", extra="Retry-After: 5"), WORKER
    )
    assert statuses(out) == ["ACK", 503]


def test_a_dead_workers_calls_are_ended_towards_the_phones() -> None:
    h, _ = media_harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2)
    # Phone 1001 calls: the INVITE reaches the worker, the worker answers.
    out = h.invite("1001", "1002", PHONE1)
    to_worker = out[1][0]
    assert isinstance(to_worker, SipRequest)
    h.send(response_bytes(to_worker, 200, "OK", to_tag="wA", extra="Contact: <sip:w@127.0.0.1:5090>"), WORKER)
    # The worker calls 1002 (leg B) through the edge; 1002 answers.
    invite_b = request_bytes(
        "INVITE", "sip:1002@127.0.0.1", from_user="1001", via_host="127.0.0.1:5090", cseq=7,
        call_id="leg-b", contact="<sip:1001@127.0.0.1:5090>", extra="Route: <sip:127.0.0.1:5060;lr>",
    )  # fmt: skip
    out = h.send(invite_b, WORKER)
    to_phone = out[1][0]
    assert isinstance(to_phone, SipRequest)
    h.send(
        response_bytes(to_phone, 200, "OK", to_tag="p2", extra="Contact: <sip:1002@127.0.0.1:5072>"), PHONE2
    )
    assert len(h.core.worker_dialogs) == 2

    assert h.core.end_worker_dialogs("127.0.0.1", 5090, h.now) == 2
    byes = {flow: m for m, flow in h.take()}
    bye_a, bye_b = byes[PHONE1], byes[PHONE2]
    assert isinstance(bye_a, SipRequest) and isinstance(bye_b, SipRequest)
    assert bye_a.method == bye_b.method == "BYE"
    # To the caller: its Contact, with the dialog's tags reversed (RFC 3261 §12.2.1.1).
    assert str(bye_a.uri) == "sip:1001@127.0.0.1:5071"
    assert bye_a.from_.tag == "wA" and bye_a.to.tag == "from1001" and bye_a.call_id == to_worker.call_id
    # To the callee: higher CSeq than the INVITE it got, tags as in the INVITE's dialog.
    assert str(bye_b.uri) == "sip:1002@127.0.0.1:5072"
    assert bye_b.cseq == (8, "BYE") and bye_b.from_.tag == "from1001" and bye_b.to.tag == "p2"
    assert "media worker failed" in (bye_b.get("Reason") or "")
    assert len(h.core.worker_dialogs) == 0


def test_a_bye_forgets_the_worker_dialog() -> None:
    h, _ = media_harness()
    h.register("1001", PHONE1)
    out = h.invite("1001", "1002", PHONE1)
    to_worker = out[1][0]
    assert isinstance(to_worker, SipRequest)
    [(ok, _)] = h.send(
        response_bytes(to_worker, 200, "OK", to_tag="wA", extra="Contact: <sip:w@127.0.0.1:5090>"), WORKER
    )
    assert isinstance(ok, SipResponse)
    [route] = ok.get_all("Record-Route")
    bye = request_bytes(
        "BYE", "sip:w@127.0.0.1:5090", call_id=to_worker.call_id, cseq=3, to_tag="wA", contact=None,
        to_uri="sip:1002@127.0.0.1", via_host="127.0.0.1:5071", extra=f"Route: {route}",
    )  # fmt: skip
    assert statuses(h.send(bye, PHONE1)) == ["BYE"]
    assert len(h.core.worker_dialogs) == 0
    assert h.core.end_worker_dialogs("127.0.0.1", 5090, h.now) == 0


def test_timer_c_cancels_a_branch_that_rings_too_long_and_a_provisional_resets_it() -> None:
    h = Harness()
    h.register("1001", PHONE1)
    h.register("1002", PHONE2)
    fwd = h.invite("1001", "1002", PHONE1)[1][0]
    assert isinstance(fwd, SipRequest)
    h.send(response_bytes(fwd, 180, "Ringing", to_tag="c"), PHONE2)
    h.tick(100)
    h.send(response_bytes(fwd, 180, "Ringing", to_tag="c"), PHONE2)  # re-arms Timer C
    assert "CANCEL" not in statuses(h.tick(170))
    out = h.tick(15)  # 185 s after the last provisional
    # One CANCEL (retransmitted over UDP until answered), for the ringing branch.
    assert set(statuses(out)) == {"CANCEL"} and {f for _, f in out} == {PHONE2}
    assert {m.top_via.branch for m, _ in out} == {fwd.top_via.branch}


def _info(content_type: str, body: str) -> SipRequest:
    return parse_request(
        request_bytes(
            "INFO", "sip:w1@127.0.0.1:5090", to_tag="w", extra=f"Content-Type: {content_type}", body=body
        )
    )


def test_an_info_carrying_application_dtmf_is_handed_on_as_dtmf_relay() -> None:
    plain = _info("application/dtmf", "5")
    assert proxy.dtmf_info_as_relay(plain)
    assert plain.get("Content-Type") == "application/dtmf-relay"
    assert plain.body == b"Signal=5\r\nDuration=250\r\n"
    again = parse_request(plain.to_bytes())  # Content-Length follows the new body
    assert again.body == plain.body
    relay = _info("application/dtmf-relay", "Signal=#\r\nDuration=100\r\n")
    assert not proxy.dtmf_info_as_relay(relay) and relay.body == b"Signal=#\r\nDuration=100\r\n"
    with pytest.raises(SipError) as raised:
        proxy.dtmf_info_as_relay(_info("application/dtmf", "55"))
    assert raised.value.status == 400
