"""SIP transactions, client and server, INVITE and non-INVITE (RFC 3261 §17, with RFC 6026).

Sans-IO: nothing here touches a socket or reads the clock. The transaction layer is given messages and
`now`; it queues what must be sent in `outbox`, calls its transaction user (the proxy core) for what the
TU must see, and tells when it next needs to wake (`next_timer()`).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Protocol

from softswitch.sip.flow import Flow
from softswitch.sip.message import Header, SipRequest, SipResponse

#: RFC 3261 §17.1.1.1: RTT estimate, the longest retransmit interval for non-INVITE requests and INVITE
#: responses, and the longest time a message may stay in the network.
T1 = 0.5
T2 = 4.0
T4 = 5.0
#: Timers B, F, H, J, L, M: 64*T1 (RFC 3261 §17, RFC 6026 §8).
TIMEOUT_64T1 = 64 * T1
#: Timer D: at least 32 s for unreliable transports (RFC 3261 §17.1.1.2).
TIMER_D = 32.0


class TxState(enum.Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class Send:
    """A message to put on the wire, over `flow`."""

    data: bytes
    flow: Flow


class TransactionUser(Protocol):
    """What the transaction layer reports to its user (RFC 3261 §17: the TU)."""

    def on_client_response(self, txn: ClientTransaction, response: SipResponse, now: float) -> None: ...

    def on_client_timeout(self, txn: ClientTransaction, now: float) -> None: ...

    def on_server_ack_timeout(self, txn: ServerTransaction, now: float) -> None: ...


def server_key(request: SipRequest) -> tuple[str, str, str]:
    """RFC 3261 §17.2.3: branch, sent-by and method (ACK and CANCEL handled by the caller)."""
    via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    sent_by = f"{via.host.lower()}:{via.port or 5060}"
    return (via.branch or "", sent_by, method)


def client_key(branch: str, method: str) -> tuple[str, str]:
    """RFC 3261 §17.1.3: a response matches by the top Via branch and the CSeq method."""
    return (branch, "INVITE" if method == "ACK" else method)


@dataclass(eq=False)
class Transaction:
    state: TxState
    flow: Flow
    timers: dict[str, float] = field(default_factory=dict)
    id: int = 0


@dataclass(eq=False)
class ServerTransaction(Transaction):
    """A server transaction; the TU answers through `TransactionLayer.respond`."""

    request: SipRequest = field(default=None)  # type: ignore[assignment]
    key: tuple[str, str, str] = ("", "", "")
    last_response: SipResponse | None = None
    last_response_bytes: bytes | None = None
    retransmit_interval: float = T1

    @property
    def is_invite(self) -> bool:
        return self.request.method == "INVITE"


@dataclass(eq=False)
class ClientTransaction(Transaction):
    """A client transaction sending `request` over `flow`."""

    request: SipRequest = field(default=None)  # type: ignore[assignment]
    branch: str = ""
    request_bytes: bytes = b""
    retransmit_interval: float = T1
    last_status: int = 0
    context: object = None  # the TU's own reference (the proxy branch)
    transport_failed: bool = False  # ended by a transport error rather than a timeout

    @property
    def is_invite(self) -> bool:
        return self.request.method == "INVITE"


class TransactionLayer:
    """Owns every transaction of the edge; one instance per edge."""

    def __init__(self, tu: TransactionUser) -> None:
        self.tu = tu
        self.outbox: list[Send] = []
        self._servers: dict[tuple[str, str, str], ServerTransaction] = {}
        self._clients: dict[tuple[str, str], ClientTransaction] = {}
        self._timers: list[tuple[float, int, Transaction, str]] = []
        self._ids = itertools.count(1)

    # -- bookkeeping ----------------------------------------------------------------------------

    @property
    def server_count(self) -> int:
        return len(self._servers)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def _arm(self, txn: Transaction, name: str, at: float) -> None:
        txn.timers[name] = at
        heapq.heappush(self._timers, (at, next(self._ids), txn, name))

    def _disarm(self, txn: Transaction, *names: str) -> None:
        for name in names:
            txn.timers.pop(name, None)

    def next_timer(self) -> float | None:
        while self._timers:
            at, _, txn, name = self._timers[0]
            if txn.timers.get(name) == at:
                return at
            heapq.heappop(self._timers)
        return None

    def handle_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            at, _, txn, name = heapq.heappop(self._timers)
            if txn.timers.get(name) != at:
                continue
            del txn.timers[name]
            if isinstance(txn, ServerTransaction):
                self._server_timer(txn, name, now)
            elif isinstance(txn, ClientTransaction):
                self._client_timer(txn, name, now)

    def _terminate_server(self, txn: ServerTransaction) -> None:
        txn.state = TxState.TERMINATED
        txn.timers.clear()
        if self._servers.get(txn.key) is txn:
            del self._servers[txn.key]

    def _terminate_client(self, txn: ClientTransaction) -> None:
        txn.state = TxState.TERMINATED
        txn.timers.clear()
        key = client_key(txn.branch, txn.request.method)
        if self._clients.get(key) is txn:
            del self._clients[key]

    # -- server side (RFC 3261 §17.2) -----------------------------------------------------------

    def find_server(self, request: SipRequest) -> ServerTransaction | None:
        return self._servers.get(server_key(request))

    def find_invite_server_for_cancel(self, cancel: SipRequest) -> ServerTransaction | None:
        """RFC 3261 §9.2: the INVITE a CANCEL refers to has the same branch and sent-by."""
        branch, sent_by, _ = server_key(cancel)
        return self._servers.get((branch, sent_by, "INVITE"))

    def absorb_ack(self, ack: SipRequest, now: float) -> bool:
        """RFC 3261 §17.2.1: True if `ack` acknowledged a non-2xx final response of ours.

        An ACK for a 2xx is its own transaction end to end (§13.2.2.4); it is not absorbed and the
        caller routes it like any in-dialog request.
        """
        existing = self._servers.get(server_key(ack))
        if existing is None or not existing.is_invite:
            return False
        if existing.state is TxState.COMPLETED:
            existing.state = TxState.CONFIRMED
            self._disarm(existing, "G", "H")
            if existing.flow.reliable:
                self._terminate_server(existing)
            else:
                self._arm(existing, "I", now + T4)
            return True
        return existing.state is TxState.CONFIRMED

    def receive_request(self, request: SipRequest, flow: Flow, now: float) -> ServerTransaction | None:
        """Match a request (not ACK) to its server transaction.

        Returns a new transaction for a new request, or None when the layer absorbed a retransmission.
        """
        existing = self._servers.get(server_key(request))
        if existing is not None:
            # A retransmission: resend the last response, if any (RFC 3261 §17.2.1, §17.2.2).
            if existing.last_response_bytes is not None and existing.state in (
                TxState.PROCEEDING,
                TxState.COMPLETED,
                TxState.TRYING,
            ):
                self.outbox.append(Send(existing.last_response_bytes, existing.flow))
            return None
        txn = ServerTransaction(
            state=TxState.PROCEEDING if request.method == "INVITE" else TxState.TRYING,
            flow=flow,
            request=request,
            key=server_key(request),
            id=next(self._ids),
        )
        self._servers[txn.key] = txn
        return txn

    def respond(self, txn: ServerTransaction, response: SipResponse, now: float) -> None:
        """Send `response` in `txn` and move its state machine."""
        if txn.state in (TxState.TERMINATED, TxState.CONFIRMED):
            return
        if txn.state is TxState.COMPLETED or (txn.state is TxState.ACCEPTED and response.status < 200):
            return
        data = response.to_bytes()
        if txn.state is TxState.ACCEPTED:
            # RFC 6026 §8.5: 2xx retransmissions from the TU pass through in Accepted.
            self.outbox.append(Send(data, txn.flow))
            return
        txn.last_response = response
        txn.last_response_bytes = data
        self.outbox.append(Send(data, txn.flow))
        status = response.status
        if status < 200:
            if txn.state is TxState.TRYING:
                txn.state = TxState.PROCEEDING
            return
        if txn.is_invite:
            if status < 300:
                txn.state = TxState.ACCEPTED
                self._arm(txn, "L", now + TIMEOUT_64T1)
            else:
                txn.state = TxState.COMPLETED
                if not txn.flow.reliable:
                    txn.retransmit_interval = T1
                    self._arm(txn, "G", now + T1)
                self._arm(txn, "H", now + TIMEOUT_64T1)
        else:
            txn.state = TxState.COMPLETED
            if txn.flow.reliable:
                self._terminate_server(txn)
            else:
                self._arm(txn, "J", now + TIMEOUT_64T1)

    def _server_timer(self, txn: ServerTransaction, name: str, now: float) -> None:
        if name == "G" and txn.state is TxState.COMPLETED and txn.last_response_bytes is not None:
            self.outbox.append(Send(txn.last_response_bytes, txn.flow))
            txn.retransmit_interval = min(2 * txn.retransmit_interval, T2)
            self._arm(txn, "G", now + txn.retransmit_interval)
        elif name == "H" and txn.state is TxState.COMPLETED:
            self._terminate_server(txn)
            self.tu.on_server_ack_timeout(txn, now)
        elif name in ("I", "J", "L"):
            self._terminate_server(txn)

    # -- client side (RFC 3261 §17.1) -----------------------------------------------------------

    def send_request(
        self, request: SipRequest, flow: Flow, now: float, *, branch: str, context: object = None
    ) -> ClientTransaction:
        """Start a client transaction; `request` already carries our Via with `branch` on top."""
        data = request.to_bytes()
        txn = ClientTransaction(
            state=TxState.CALLING if request.method == "INVITE" else TxState.TRYING,
            flow=flow,
            request=request,
            branch=branch,
            request_bytes=data,
            context=context,
            id=next(self._ids),
        )
        self._clients[client_key(branch, request.method)] = txn
        self.outbox.append(Send(data, flow))
        if not flow.reliable:
            self._arm(txn, "A" if txn.is_invite else "E", now + T1)
        self._arm(txn, "B" if txn.is_invite else "F", now + TIMEOUT_64T1)
        return txn

    def receive_response(self, response: SipResponse, now: float) -> ClientTransaction | None:
        """Match a response to a client transaction (None: no match, forward it statelessly)."""
        try:
            branch = response.top_via.branch or ""
            _, method = response.cseq
        except Exception:
            return None
        txn = self._clients.get(client_key(branch, method))
        if txn is None or (method == "ACK"):
            return None
        status = response.status
        if txn.state is TxState.TERMINATED:
            return None
        if txn.is_invite:
            self._invite_client_response(txn, response, now)
        else:
            self._non_invite_client_response(txn, response, now)
        txn.last_status = status
        return txn

    def _invite_client_response(self, txn: ClientTransaction, response: SipResponse, now: float) -> None:
        status = response.status
        if txn.state in (TxState.CALLING, TxState.PROCEEDING):
            self._disarm(txn, "A")
            if status < 200:
                txn.state = TxState.PROCEEDING
                self._disarm(txn, "B")
                self.tu.on_client_response(txn, response, now)
            elif status < 300:
                # RFC 6026 §7.2: Accepted, so 2xx retransmissions still reach the TU.
                txn.state = TxState.ACCEPTED
                self._disarm(txn, "B")
                self._arm(txn, "M", now + TIMEOUT_64T1)
                self.tu.on_client_response(txn, response, now)
            else:
                txn.state = TxState.COMPLETED
                self._disarm(txn, "B")
                self._send_ack(txn, response)
                if txn.flow.reliable:
                    self._terminate_client(txn)
                else:
                    self._arm(txn, "D", now + TIMER_D)
                self.tu.on_client_response(txn, response, now)
        elif txn.state is TxState.COMPLETED and status >= 300:
            self._send_ack(txn, response)  # retransmitted final response: ACK again, TU not told
        elif txn.state is TxState.ACCEPTED and 200 <= status < 300:
            self.tu.on_client_response(txn, response, now)

    def _non_invite_client_response(self, txn: ClientTransaction, response: SipResponse, now: float) -> None:
        status = response.status
        if txn.state not in (TxState.TRYING, TxState.PROCEEDING):
            return
        if status < 200:
            if txn.state is TxState.TRYING:
                txn.state = TxState.PROCEEDING
            self.tu.on_client_response(txn, response, now)
            return
        txn.state = TxState.COMPLETED
        self._disarm(txn, "E", "F")
        if txn.flow.reliable:
            self._terminate_client(txn)
        else:
            self._arm(txn, "K", now + T4)
        self.tu.on_client_response(txn, response, now)

    def _send_ack(self, txn: ClientTransaction, response: SipResponse) -> None:
        """RFC 3261 §17.1.1.3: the ACK of a non-2xx final response, built by the transaction."""
        req = txn.request
        headers: list[Header] = []
        for name in ("Via",):
            vals = req.get_all(name)
            if vals:
                headers.append(Header(name, vals[0]))
        for name in ("Max-Forwards", "Route"):
            for value in req.get_all(name) if name == "Route" else [req.get(name) or ""]:
                if value:
                    headers.append(Header(name, value))
        headers.append(Header("From", req.get("From") or ""))
        headers.append(Header("To", response.get("To") or ""))
        headers.append(Header("Call-ID", req.get("Call-ID") or ""))
        headers.append(Header("CSeq", f"{req.cseq[0]} ACK"))
        ack = SipRequest("ACK", req.uri, headers)
        self.outbox.append(Send(ack.to_bytes(), txn.flow))

    def _client_timer(self, txn: ClientTransaction, name: str, now: float) -> None:
        if name in ("A", "E") and txn.state in (TxState.CALLING, TxState.TRYING, TxState.PROCEEDING):
            self.outbox.append(Send(txn.request_bytes, txn.flow))
            if name == "A":
                txn.retransmit_interval *= 2
            elif txn.state is TxState.PROCEEDING:
                txn.retransmit_interval = T2
            else:
                txn.retransmit_interval = min(2 * txn.retransmit_interval, T2)
            self._arm(txn, name, now + txn.retransmit_interval)
        elif name in ("B", "F"):
            self._terminate_client(txn)
            self.tu.on_client_timeout(txn, now)
        elif name in ("D", "K", "M"):
            self._terminate_client(txn)

    def clients_on(self, transport: str, host: str, port: int) -> list[ClientTransaction]:
        """Live client transactions sending to this address (to fail them when it is unreachable)."""
        return [
            t
            for t in self._clients.values()
            if t.state is not TxState.TERMINATED
            and (t.flow.transport, t.flow.host, t.flow.port) == (transport, host, port)
        ]

    def transport_error(self, txn: ClientTransaction, now: float) -> None:
        """RFC 3261 §17.1.4: a transport failure is reported to the TU like a timeout."""
        if txn.state is TxState.TERMINATED:
            return
        txn.transport_failed = True
        self._terminate_client(txn)
        self.tu.on_client_timeout(txn, now)
