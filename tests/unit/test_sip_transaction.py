"""RFC 3261 §17 transaction state machines, driven with a fake clock."""

from __future__ import annotations

from softswitch.sip.flow import Flow
from softswitch.sip.message import SipRequest, SipResponse, make_response
from softswitch.sip.transaction import (
    T1,
    T2,
    TIMEOUT_64T1,
    ClientTransaction,
    ServerTransaction,
    TransactionLayer,
    TxState,
)

from .siputil import parse_request, parse_response, request_bytes, response_bytes

UDP = Flow("UDP", "127.0.0.1", 5070)
TCP = Flow("TCP", "127.0.0.1", 5070, 1)


class RecordingTU:
    def __init__(self) -> None:
        self.responses: list[tuple[ClientTransaction, int]] = []
        self.timeouts: list[ClientTransaction] = []
        self.ack_timeouts: list[ServerTransaction] = []

    def on_client_response(self, txn: ClientTransaction, response: SipResponse, now: float) -> None:
        self.responses.append((txn, response.status))

    def on_client_timeout(self, txn: ClientTransaction, now: float) -> None:
        self.timeouts.append(txn)

    def on_server_ack_timeout(self, txn: ServerTransaction, now: float) -> None:
        self.ack_timeouts.append(txn)


def run_until(layer: TransactionLayer, start: float, end: float) -> list[float]:
    """Fire every timer up to `end`; returns the times at which something was sent."""
    sent_at: list[float] = []
    now = start
    while True:
        at = layer.next_timer()
        if at is None or at > end:
            return sent_at
        now = at
        before = len(layer.outbox)
        layer.handle_timers(now)
        if len(layer.outbox) > before:
            sent_at.append(now)


def client(method: str, flow: Flow = UDP) -> tuple[TransactionLayer, RecordingTU, ClientTransaction]:
    tu = RecordingTU()
    layer = TransactionLayer(tu)
    req = parse_request(request_bytes(method, "sip:1002@127.0.0.1", branch="z9hG4bKclient1"))
    txn = layer.send_request(req, flow, 0.0, branch="z9hG4bKclient1")
    return layer, tu, txn


def test_invite_client_retransmits_with_timer_a_doubling_and_times_out_with_timer_b() -> None:
    layer, tu, txn = client("INVITE")
    assert len(layer.outbox) == 1
    sent = run_until(layer, 0.0, 100.0)
    # Timer A: T1, 2T1, 4T1 ... until Timer B (64*T1) fires.
    expected, t, interval = [], 0.0, T1
    while t + interval < TIMEOUT_64T1:
        t += interval
        expected.append(t)
        interval *= 2
    assert sent == expected
    assert tu.timeouts == [txn]
    assert txn.state is TxState.TERMINATED


def test_invite_client_over_tcp_never_retransmits() -> None:
    layer, tu, txn = client("INVITE", TCP)
    assert run_until(layer, 0.0, 100.0) == []
    assert tu.timeouts == [txn]


def test_invite_client_provisional_stops_retransmission_and_timer_b() -> None:
    layer, tu, txn = client("INVITE")
    layer.receive_response(parse_response(response_bytes(txn.request, 180, "Ringing", to_tag="t")), 0.2)
    assert txn.state is TxState.PROCEEDING
    assert run_until(layer, 0.2, 200.0) == []
    assert tu.timeouts == []
    assert tu.responses == [(txn, 180)]


def test_invite_client_non_2xx_is_acked_by_the_transaction_and_retransmissions_reacked() -> None:
    layer, tu, txn = client("INVITE")
    layer.outbox.clear()
    busy = parse_response(response_bytes(txn.request, 486, "Busy Here", to_tag="b1"))
    layer.receive_response(busy, 0.1)
    assert txn.state is TxState.COMPLETED
    assert len(layer.outbox) == 1
    ack = parse_request(layer.outbox[0].data)
    assert ack.method == "ACK"
    assert ack.top_via.branch == "z9hG4bKclient1"  # same branch as the INVITE (§17.1.1.3)
    assert ack.to.tag == "b1"
    assert ack.cseq == (txn.request.cseq[0], "ACK")
    layer.receive_response(busy, 0.6)  # retransmitted 486
    assert len(layer.outbox) == 2
    assert tu.responses == [(txn, 486)]  # the TU saw it once
    run_until(layer, 0.6, 40.0)  # Timer D
    assert txn.state is TxState.TERMINATED


def test_invite_client_2xx_goes_to_accepted_and_retransmissions_reach_the_tu() -> None:
    layer, tu, txn = client("INVITE")
    ok = parse_response(response_bytes(txn.request, 200, "OK", to_tag="a"))
    layer.receive_response(ok, 0.1)
    assert txn.state is TxState.ACCEPTED
    layer.receive_response(ok, 0.6)
    assert [s for _, s in tu.responses] == [200, 200]  # RFC 6026 §7.2
    run_until(layer, 0.6, 0.1 + TIMEOUT_64T1 + 1)
    assert txn.state is TxState.TERMINATED


def test_non_invite_client_timer_e_caps_at_t2_and_timer_f_times_out() -> None:
    layer, tu, txn = client("OPTIONS")
    sent = run_until(layer, 0.0, 100.0)
    intervals = [b - a for a, b in zip([0.0, *sent], sent, strict=False)]
    assert intervals[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(intervals) == T2
    assert tu.timeouts == [txn]


def test_non_invite_client_final_response_then_timer_k() -> None:
    layer, tu, txn = client("OPTIONS")
    layer.receive_response(parse_response(response_bytes(txn.request, 200, "OK", to_tag="x")), 0.1)
    assert txn.state is TxState.COMPLETED
    assert tu.responses == [(txn, 200)]
    run_until(layer, 0.1, 10.0)
    assert txn.state is TxState.TERMINATED
    assert tu.timeouts == []


def server(method: str, flow: Flow = UDP) -> tuple[TransactionLayer, RecordingTU, SipRequest]:
    tu = RecordingTU()
    layer = TransactionLayer(tu)
    req = parse_request(request_bytes(method, "sip:1002@127.0.0.1", branch="z9hG4bKserver1"))
    return layer, tu, req


def test_server_absorbs_retransmissions_and_resends_last_response() -> None:
    layer, _tu, req = server("INVITE")
    txn = layer.receive_request(req, UDP, 0.0)
    assert txn is not None
    layer.respond(txn, make_response(req, 100), 0.0)
    assert layer.receive_request(req, UDP, 0.5) is None
    assert [parse_response(s.data).status for s in layer.outbox] == [100, 100]


def test_invite_server_retransmits_final_with_timer_g_until_ack() -> None:
    layer, tu, req = server("INVITE")
    txn = layer.receive_request(req, UDP, 0.0)
    assert txn is not None
    layer.respond(txn, make_response(req, 486, to_tag="s"), 0.0)
    sent = run_until(layer, 0.0, 3.6)
    assert sent == [0.5, 1.5, 3.5]  # T1, then doubling
    ack = parse_request(
        request_bytes(
            "ACK",
            "sip:1002@127.0.0.1",
            branch="z9hG4bKserver1",
            call_id=req.call_id,
            to_tag="s",
            contact=None,
        )
    )
    assert layer.absorb_ack(ack, 3.6)
    assert txn.state is TxState.CONFIRMED
    assert run_until(layer, 3.6, 20.0) == []
    assert txn.state is TxState.TERMINATED
    assert tu.ack_timeouts == []


def test_invite_server_timer_h_reports_a_missing_ack() -> None:
    layer, tu, req = server("INVITE")
    txn = layer.receive_request(req, UDP, 0.0)
    assert txn is not None
    layer.respond(txn, make_response(req, 603, to_tag="s"), 0.0)
    sent = run_until(layer, 0.0, 100.0)
    assert tu.ack_timeouts == [txn]
    assert txn.state is TxState.TERMINATED
    intervals = [b - a for a, b in zip([0.0, *sent], sent, strict=False)]
    assert max(intervals) == T2  # retransmissions capped at T2 (§17.2.1)
    assert sent[-1] < TIMEOUT_64T1


def test_2xx_ack_is_not_absorbed() -> None:
    layer, _tu, req = server("INVITE")
    txn = layer.receive_request(req, UDP, 0.0)
    assert txn is not None
    layer.respond(txn, make_response(req, 200, to_tag="s"), 0.0)
    assert txn.state is TxState.ACCEPTED
    ack = parse_request(
        request_bytes(
            "ACK",
            "sip:1002@127.0.0.1",
            branch="z9hG4bKotherack",
            call_id=req.call_id,
            to_tag="s",
            contact=None,
        )
    )
    assert not layer.absorb_ack(ack, 0.1)


def test_non_invite_server_over_tcp_terminates_at_once() -> None:
    layer, _tu, req = server("OPTIONS", TCP)
    txn = layer.receive_request(req, TCP, 0.0)
    assert txn is not None
    layer.respond(txn, make_response(req, 200, to_tag="s"), 0.0)
    assert txn.state is TxState.TERMINATED
    assert layer.server_count == 0


def test_non_invite_server_timer_j_keeps_answering_retransmissions_over_udp() -> None:
    layer, _tu, req = server("OPTIONS")
    txn = layer.receive_request(req, UDP, 0.0)
    assert txn is not None
    layer.respond(txn, make_response(req, 200, to_tag="s"), 0.0)
    assert layer.receive_request(req, UDP, 10.0) is None
    assert len(layer.outbox) == 2
    run_until(layer, 10.0, TIMEOUT_64T1 + 1)
    assert layer.server_count == 0
    assert layer.receive_request(req, UDP, TIMEOUT_64T1 + 2) is not None  # a new transaction now
