"""The SIP edge core: registrar, digest authentication and stateful proxy, without I/O.

`EdgeCore.receive(data, flow, now)` takes one message as it came off a socket; what must be sent is
collected in `outbox`, device events in `events`, binding changes to persist in `binding_changes`. The
adapter (`transport.py`) drains those and wakes the core at `next_timer()`.

Forwarding follows RFC 3261 §16 as a transaction-stateful proxy with parallel forking to every binding
of the target user; responses are chosen per §16.7.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from softswitch.events.types import DeviceRegistered, DeviceUnregistered, Event
from softswitch.metrics import Metrics
from softswitch.sip import proxy
from softswitch.sip.dialogs import WorkerDialogs
from softswitch.sip.digest import AuthOutcome, DigestAuthenticator
from softswitch.sip.errors import SipError, SipParseError
from softswitch.sip.flow import Flow
from softswitch.sip.headers import Via
from softswitch.sip.location import Binding, LocationService
from softswitch.sip.message import Header, SipRequest, SipResponse, make_response, new_tag
from softswitch.sip.parser import parse_message
from softswitch.sip.proxy import FLOW_TOKEN_PARAM, FlowTokens, IsUs, RouteTokens
from softswitch.sip.ratelimit import AuthFailureLimiter
from softswitch.sip.registrar import Registrar, RegistrarPolicy
from softswitch.sip.transaction import (
    ClientTransaction,
    Send,
    ServerTransaction,
    TransactionLayer,
    TxState,
)
from softswitch.sip.uri import SipUri

log = structlog.get_logger(__name__)

#: Methods the edge itself answers or forwards (the Allow of our OPTIONS answer).
ALLOWED_METHODS = (
    "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, REFER, NOTIFY, SUBSCRIBE, MESSAGE, INFO, UPDATE, PRACK"
)
#: Requests that only exist inside a dialog: outside one they are answered 481 (RFC 3261 §15.1.2).
OUT_OF_DIALOG_FORBIDDEN = frozenset({"BYE", "PRACK", "UPDATE", "INFO"})
#: RFC 3261 §16.6 step 11, Timer C: an INVITE branch with no final response is cancelled after this.
TIMER_C = 180.0
#: Reason header on the CANCELs of losing branches (RFC 3326).
CALL_COMPLETED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'

BindingChange = tuple[str, Binding]  # ("upsert" | "delete", binding)


class TokenBucket:
    """Admission by rate: `rate` tokens a second, at most `burst` saved up (sans-IO: `now` is given)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated: float | None = None

    def _refill(self, now: float) -> None:
        if self.updated is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def available(self, now: float) -> bool:
        """Whether a token could be taken now (without taking it)."""
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    """What the core needs to know about itself (built from the configuration by the adapter)."""

    host: str  # address written into Via and Record-Route
    port: int
    domain: str
    aliases: frozenset[str]  # other host names that mean us
    realm: str
    secret: bytes
    policy: RegistrarPolicy
    nonce_ttl_s: float = 300.0
    digest_algorithms: tuple[str, ...] = ("MD5",)
    max_cps: float = 15.0  # new calls per second admitted to the media plane
    auth_max_failures: int = 5
    auth_failure_window_s: float = 60.0
    auth_block_s: float = 60.0
    server_header: str = "softswitch"


@dataclass(eq=False)
class ProxyBranch:
    """One forwarded copy of a request (RFC 3261 §16.6) and what came back on it."""

    txn: ClientTransaction | None
    binding: Binding | None
    flow: Flow
    request: SipRequest
    final: SipResponse | None = None
    provisional: bool = False  # a provisional response arrived (a CANCEL may be sent, §9.1)
    cancel_pending: bool = False
    timer_c: float | None = None


@dataclass(eq=False)
class ProxyContext:
    """The response context of one server transaction (RFC 3261 §16.7)."""

    server: ServerTransaction
    record_routed: bool
    caller_flow: Flow
    branches: list[ProxyBranch] = field(default_factory=list)
    best: SipResponse | None = None
    answered: bool = False  # a 2xx or 6xx went back: the context is decided
    cancelled: bool = False


class EdgeCore:
    """Registrar, authenticator and proxy of one edge node."""

    def __init__(
        self,
        settings: EdgeSettings,
        passwords: Mapping[str, str],
        location: LocationService,
        metrics: Metrics,
        *,
        trusted: Callable[[Flow], bool] = lambda _flow: False,
        media_dispatch: Callable[[], Flow | None] | None = None,
    ) -> None:
        self.settings = settings
        self.passwords = passwords
        self.location = location
        self.metrics = metrics
        self.trusted = trusted
        # With a media plane, every call from a phone goes to a B2BUA worker; without one (unit tests of
        # the proxy rules), calls are proxied user to user.
        self.media_dispatch = media_dispatch
        self.worker_dialogs = WorkerDialogs()
        self.admission = TokenBucket(rate=settings.max_cps, burst=max(1.0, settings.max_cps))
        self.is_us = IsUs(
            {settings.host, *settings.aliases},
            settings.port,
            {settings.domain},
        )
        self.tokens = FlowTokens(settings.secret)
        self.auth = DigestAuthenticator(
            settings.realm,
            settings.secret,
            nonce_ttl_s=settings.nonce_ttl_s,
            algorithms=settings.digest_algorithms,
        )
        self.limiter = AuthFailureLimiter(
            max_failures=settings.auth_max_failures,
            window_s=settings.auth_failure_window_s,
            block_s=settings.auth_block_s,
        )
        self.registrar = Registrar(location, settings.policy)
        self.transactions = TransactionLayer(self)
        self.outbox: list[Send] = self.transactions.outbox
        self.events: list[Event] = []
        self.binding_changes: list[BindingChange] = []
        self._contexts: dict[int, ProxyContext] = {}  # by server transaction id
        self._timer_c: dict[int, tuple[ProxyContext, ProxyBranch]] = {}
        self._timer_c_heap: list[tuple[float, int]] = []  # (deadline, branch key), lazily pruned

    # -- entry points ---------------------------------------------------------------------------

    def receive(self, data: bytes, flow: Flow, now: float) -> None:
        """Process one message received over `flow`. Never raises."""
        try:
            message = parse_message(data)
        except SipParseError as e:
            self.reject_unparsable(e, flow)
            return
        except Exception:  # a parser bug must not take the edge down
            log.exception("parser failure", flow=str(flow), size=len(data))
            self.metrics.sip_parse_errors.labels(action="dropped").inc()
            return
        try:
            if isinstance(message, SipRequest):
                self.metrics.sip_requests.labels(method=message.method).inc()
                with structlog.contextvars.bound_contextvars(
                    sip_call_id=message.get("Call-ID"), method=message.method
                ):
                    self._on_request(message, flow, now)
            else:
                self._on_response(message, flow, now)
        except SipError as e:
            if isinstance(message, SipRequest) and message.method != "ACK":
                self._reply_stateless(message, flow, e.status, e.reason, e.headers)
        except Exception:
            log.exception("failure processing a SIP message", flow=str(flow))
            if isinstance(message, SipRequest) and message.method != "ACK":
                self._reply_stateless(message, flow, 500, "Server Internal Error")

    def next_timer(self) -> float | None:
        candidates = [
            t
            for t in (self.transactions.next_timer(), self.location.next_expiry(), self._next_timer_c())
            if t
        ]
        return min(candidates) if candidates else None

    def handle_timers(self, now: float) -> None:
        self.transactions.handle_timers(now)
        for binding in self.registrar.expire(now):
            self._binding_gone(binding, "expired")
        while self._timer_c_heap and self._timer_c_heap[0][0] <= now:
            at, key = heapq.heappop(self._timer_c_heap)
            entry = self._timer_c.get(key)
            if entry is None or entry[1].timer_c != at:
                continue  # answered, failed or re-armed since
            ctx, branch = entry
            del self._timer_c[key]
            branch.timer_c = None
            self._cancel_branch(ctx, branch, now, reason=None)

    def _arm_timer_c(self, ctx: ProxyContext, branch: ProxyBranch, at: float) -> None:
        branch.timer_c = at
        self._timer_c[id(branch)] = (ctx, branch)
        heapq.heappush(self._timer_c_heap, (at, id(branch)))

    def _next_timer_c(self) -> float | None:
        # Entries of answered or re-armed branches linger in the heap; they are dropped here.
        while self._timer_c_heap:
            at, key = self._timer_c_heap[0]
            entry = self._timer_c.get(key)
            if entry is not None and entry[1].timer_c == at:
                return at
            heapq.heappop(self._timer_c_heap)
        return None

    def flow_failed(self, flow: Flow, now: float) -> None:
        """The adapter could not reach `flow` (TCP connect refused): fail its requests at once.

        RFC 3261 §8.1.3.1 treats a transport failure like a 503 from that hop; the caller is told the
        device is unreachable (480) instead of waiting for Timer B.
        """
        for txn in self.transactions.clients_on(flow.transport, flow.host, flow.port):
            self.transactions.transport_error(txn, now)

    # -- parse errors ---------------------------------------------------------------------------

    def reject_unparsable(self, error: SipParseError, flow: Flow) -> None:
        msg = error.message
        if isinstance(msg, SipRequest) and msg.method != "ACK":
            try:
                if msg.get_all("Via"):
                    msg.top_via  # noqa: B018 - the Via must at least be readable to answer
                    response = make_response(msg, error.status, error.reason)
                    self.outbox.append(Send(response.to_bytes(), flow))
                    self.metrics.sip_parse_errors.labels(action="answered").inc()
                    self.metrics.sip_responses_sent.labels(code=str(error.status)).inc()
                    log.info("rejected malformed request", reason=error.reason, flow=str(flow))
                    return
            except Exception:
                pass
        self.metrics.sip_parse_errors.labels(action="dropped").inc()
        log.info("dropped unparsable message", reason=error.reason, flow=str(flow))

    # -- responses we generate ------------------------------------------------------------------

    def _response(
        self,
        request: SipRequest,
        status: int,
        reason: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> SipResponse:
        to_tag = None if status == 100 or request.to.tag else new_tag()
        response = make_response(request, status, reason, to_tag=to_tag)
        for name, value in headers or []:
            response.add(name, value)
        response.add("Server", self.settings.server_header)
        self.metrics.sip_responses_sent.labels(code=str(status)).inc()
        return response

    def _reply(
        self,
        txn: ServerTransaction,
        status: int,
        reason: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        now: float | None = None,
    ) -> None:
        response = self._response(txn.request, status, reason, headers)
        self.transactions.respond(txn, response, now if now is not None else time.monotonic())

    def _reply_stateless(
        self,
        request: SipRequest,
        flow: Flow,
        status: int,
        reason: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        try:
            response = self._response(request, status, reason, headers)
        except Exception:
            log.info("cannot answer request", status=status, reason=reason)
            return
        self.outbox.append(Send(response.to_bytes(), flow))

    # -- requests -------------------------------------------------------------------------------

    def _on_request(self, request: SipRequest, flow: Flow, now: float) -> None:
        self._stamp_via(request, flow)
        if request.method == "ACK":
            if not self.transactions.absorb_ack(request, now):
                self._forward_ack(request, flow)
            return
        if request.method == "CANCEL":
            self._on_cancel(request, flow, now)
            return
        txn = self.transactions.receive_request(request, flow, now)
        if txn is None:
            return  # a retransmission, answered by the transaction layer
        try:
            self._process(txn, now)
        except SipError as e:
            self._reply(txn, e.status, e.reason, e.headers, now)

    def _stamp_via(self, request: SipRequest, flow: Flow) -> None:
        """RFC 3261 §18.2.1 `received` and RFC 3581 `rport` on the top Via."""
        via = request.top_via
        changed = False
        if via.has_param("rport"):
            via.set_param("rport", str(flow.port))
            via.set_param("received", flow.host)
            changed = True
        elif via.host != flow.host:
            via.set_param("received", flow.host)
            changed = True
        if changed:
            request.pop_first_value("Via")
            request.add("Via", str(via), first=True)

    def _process(self, txn: ServerTransaction, now: float) -> None:
        request = txn.request
        proxy.check_max_forwards(request)
        route_uri = proxy.pop_our_route(request, self.is_us)
        if request.to.tag is not None:
            self._route_in_dialog(txn, route_uri, now)
            return
        if request.get_all("Route"):
            raise SipError(403, "Route to an unknown destination")
        proxy.check_proxy_require(request)
        if request.method == "REGISTER":
            self._on_register(txn, now)
            return
        if request.method == "OPTIONS" and self.is_us.uri(request.uri) and not request.uri.user:
            self._reply(
                txn,
                200,
                headers=[
                    ("Allow", ALLOWED_METHODS),
                    ("Accept", "application/sdp"),
                    ("Supported", "path, replaces"),
                ],
                now=now,
            )
            return
        if request.method in OUT_OF_DIALOG_FORBIDDEN:
            raise SipError(481, "Call/Transaction Does Not Exist")
        proxy.check_loop(request, self.is_us)
        identity: str | None = None
        if not self.trusted(txn.flow):
            if (
                request.method == "INVITE"
                and self.media_dispatch is not None
                and not self.admission.available(now)
            ):
                # Shed load before spending a challenge round on a call that would be refused anyway.
                self.metrics.calls_refused.labels(reason="rate").inc()
                raise SipError(503, "Service Unavailable (call rate limit)", [("Retry-After", "1")])
            proxy.strip_untrusted_identity(request)
            identity = self._authenticate(txn, proxy_auth=True, now=now)
            if identity is None:
                return
            from_user = request.from_.uri.user
            if from_user != identity:
                raise SipError(403, "From does not match the authenticated user")
            if request.method == "INVITE" and self.media_dispatch is not None:
                if not self._route_replaces(txn, identity, now):
                    self._route_to_media(txn, identity, now)
                return
        elif request.method == "INVITE" and self._route_replaces(txn, identity, now):
            return
        self._route_initial(txn, identity, now)

    def _route_replaces(self, txn: ServerTransaction, identity: str | None, now: float) -> bool:
        """An INVITE with `Replaces` (RFC 3891) naming a dialog between a phone and a media worker goes to
        that worker, which holds the dialog and so can replace it (the second half of an attended
        transfer: from the transferee's worker, or from a phone). False when the edge knows no such
        dialog: the INVITE is routed as usual, and whoever receives it answers for the dialog (481)."""
        request = txn.request
        replaces = request.get("Replaces")
        if not replaces or self.media_dispatch is None:
            return False
        worker = self.worker_dialogs.worker_of(replaces.split(";", 1)[0].strip())
        if worker is None:
            return False
        log.info(
            "INVITE with Replaces steered to the worker of the dialog", worker=f"{worker.host}:{worker.port}"
        )
        self._forward_to_worker(txn, identity, worker, now)
        return True

    def _forward_to_worker(
        self, txn: ServerTransaction, identity: str | None, worker: Flow, now: float
    ) -> None:
        """Proxy the INVITE to a media worker, record-routed, vouching for the caller's `identity`."""
        ctx = ProxyContext(server=txn, record_routed=True, caller_flow=txn.flow)
        self._contexts[txn.id] = ctx
        self._reply(txn, 100, "Trying", now=now)
        copy = txn.request.copy()
        if identity is not None:
            copy.add(proxy.IDENTITY_HEADER, identity)
        self._forward(ctx, copy, worker, None, 0, now)

    def _route_to_media(self, txn: ServerTransaction, identity: str | None, now: float) -> None:
        """A call from a phone becomes the A-leg of a conversation on the worker with most room."""
        assert self.media_dispatch is not None
        if not self.admission.take(now):
            self.metrics.calls_refused.labels(reason="rate").inc()
            raise SipError(503, "Service Unavailable (call rate limit)", [("Retry-After", "1")])
        worker = self.media_dispatch()
        if worker is None:
            self.metrics.calls_refused.labels(reason="capacity").inc()
            raise SipError(503, "Service Unavailable (no call capacity)", [("Retry-After", "5")])
        self._forward_to_worker(txn, identity, worker, now)

    # -- authentication (RFC 3261 §22, RFC 7616) ---------------------------------------------------

    def _authenticate(self, txn: ServerTransaction, *, proxy_auth: bool, now: float) -> str | None:
        """The authenticated user name, or None after answering 401/407/403."""
        request = txn.request
        header = "Proxy-Authorization" if proxy_auth else "Authorization"
        claimed = request.from_.uri.user if proxy_auth else request.to.uri.user
        source = txn.flow.host
        if self.limiter.blocked(source, claimed, now):
            self.metrics.auth_blocked.inc()
            raise SipError(403, "Forbidden (too many failed authentications)")
        result = self.auth.verify(
            method=request.method,
            headers=request.get_all(header),
            now=now,
            lookup_password=self.passwords.get,
        )
        if result.outcome is AuthOutcome.OK:
            self.limiter.success(source, result.username or "", now)
            return result.username
        status = 407 if proxy_auth else 401
        if result.outcome in (AuthOutcome.MISSING,):
            self._reply(txn, status, headers=self.auth.challenge(now, proxy=proxy_auth), now=now)
            return None
        if result.outcome is AuthOutcome.STALE:
            self._reply(txn, status, headers=self.auth.challenge(now, proxy=proxy_auth, stale=True), now=now)
            return None
        self.metrics.auth_failures.labels(method=request.method).inc()
        user = result.username or claimed
        started_block = self.limiter.failure(source, user, now)
        log.warning(
            "authentication failed",
            source=f"{txn.flow.host}:{txn.flow.port}",
            transport=txn.flow.transport,
            user=user,
            outcome=result.outcome.name.lower(),
            detail=result.detail,
            blocked=started_block,
        )
        if self.limiter.blocked(source, user, now):
            self.metrics.auth_blocked.inc()
            raise SipError(403, "Forbidden (too many failed authentications)")
        if result.outcome is AuthOutcome.MALFORMED:
            raise SipError(400, f"Bad {header} header")
        # Wrong password and unknown user get the same answer, so user names cannot be probed.
        self._reply(txn, status, headers=self.auth.challenge(now, proxy=proxy_auth), now=now)
        return None

    # -- registrar ------------------------------------------------------------------------------

    def _on_register(self, txn: ServerTransaction, now: float) -> None:
        request = txn.request
        if not self.is_us.uri(request.uri):
            raise SipError(403, "Not a domain of this registrar")
        aor_uri = request.to.uri
        if not self.is_us(aor_uri.host, None) and not self.is_us.uri(aor_uri):
            raise SipError(404, "Not Found (domain not served here)")
        aor = aor_uri.user or ""
        user = self._authenticate(txn, proxy_auth=False, now=now)
        if user is None:
            return
        if user != aor:
            raise SipError(403, "Not allowed to register this address-of-record")
        result = self.registrar.process(request, aor, txn.flow, now)
        result.response.add("Server", self.settings.server_header)
        self.metrics.sip_responses_sent.labels(code=str(result.response.status)).inc()
        self.transactions.respond(txn, result.response, now)
        for binding in result.added:
            self._binding_added(binding, now, "registered")
        for binding in result.refreshed:
            self.binding_changes.append(("upsert", binding))
        for binding, reason in result.removed:
            self._binding_gone(binding, reason)

    def _binding_added(self, binding: Binding, now: float, reason: str) -> None:
        self.binding_changes.append(("upsert", binding))
        self._update_registration_metrics()
        log.info(
            "device registered",
            user=binding.aor,
            contact=binding.contact,
            flow=str(binding.flow),
            expires=binding.remaining(now),
        )
        self.events.append(
            DeviceRegistered(
                user=binding.aor,
                contact=binding.contact,
                transport=binding.flow.transport.lower(),
                expires=binding.remaining(now),
                user_agent=binding.user_agent,
                source=f"{binding.flow.host}:{binding.flow.port}",
                reason=reason,
            )
        )

    def _binding_gone(self, binding: Binding, reason: str) -> None:
        self.binding_changes.append(("delete", binding))
        self._update_registration_metrics()
        log.info("device unregistered", user=binding.aor, contact=binding.contact, reason=reason)
        self.events.append(
            DeviceUnregistered(
                user=binding.aor,
                contact=binding.contact,
                transport=binding.flow.transport.lower(),
                reason=reason,
            )
        )

    def _update_registration_metrics(self) -> None:
        self.metrics.registrations.set(len(self.location))
        self.metrics.registered_users.set(self.location.user_count)

    # -- proxying out-of-dialog requests (RFC 3261 §16.5, §16.6) ----------------------------------

    def _route_initial(self, txn: ServerTransaction, identity: str | None, now: float) -> None:
        request = txn.request
        uri = request.uri
        if not self.is_us.uri(uri) and not self.is_us(uri.host, None):
            raise SipError(403, "Relaying denied")
        user = uri.user or ""
        if user not in self.passwords:
            if request.method == "INVITE" and self.media_dispatch is not None and self.trusted(txn.flow):
                # A media worker calling a number that is no user (the target of a transfer a phone asked
                # for by REFER): a new call like a phone's, which the dialplan routes; the worker's From
                # names the party being transferred.
                self._route_to_media(txn, request.from_.uri.user or None, now)
                return
            raise SipError(404, "Not Found")
        bindings = self.location.bindings(user)
        if not bindings:
            raise SipError(480, "Temporarily Unavailable")
        record_route = request.method in proxy.RECORD_ROUTE_METHODS
        ctx = ProxyContext(server=txn, record_routed=record_route, caller_flow=txn.flow)
        self._contexts[txn.id] = ctx
        if request.method == "INVITE":
            self._reply(txn, 100, "Trying", now=now)
        for index, binding in enumerate(bindings):
            copy = request.copy()
            copy.uri = binding.uri
            if identity is not None:
                copy.add(
                    "P-Asserted-Identity",
                    f"<sip:{identity}@{self.settings.domain}>",
                )
            self._forward(ctx, copy, binding.flow, binding, index, now)

    def _forward(
        self,
        ctx: ProxyContext,
        request: SipRequest,
        flow: Flow,
        binding: Binding | None,
        index: int,
        now: float,
    ) -> None:
        """RFC 3261 §16.6 steps 3-10 for one target, then start its client transaction."""
        proxy.decrement_max_forwards(request)
        if ctx.record_routed:
            token = self.tokens.encode(ctx.caller_flow)
            request.add(
                "Record-Route",
                proxy.record_route_value(
                    self.settings.host, self.settings.port, flow.transport, [(FLOW_TOKEN_PARAM, token)]
                ),
                first=True,
            )
        branch = proxy.branch_for(ctx.server.request, index)
        via = f"SIP/2.0/{flow.transport} {self.settings.host}:{self.settings.port};branch={branch};rport"
        request.add("Via", via, first=True)
        pb = ProxyBranch(txn=None, binding=binding, flow=flow, request=request)
        ctx.branches.append(pb)
        pb.txn = self.transactions.send_request(request, flow, now, branch=branch, context=(ctx, pb))
        self.metrics.sip_forwarded.labels(kind="request").inc()
        if request.method == "INVITE":
            self._arm_timer_c(ctx, pb, now + TIMER_C)

    # -- in-dialog requests (RFC 3261 §16.12 loose routing) ---------------------------------------

    def _dialog_destination(self, request: SipRequest, route_uri: SipUri | None, source: Flow) -> Flow:
        """Where an in-dialog request goes: by our Record-Route's flow tokens, else by location."""
        tokens = self._route_tokens(route_uri)
        came_from_caller = tokens.caller is not None and (
            tokens.caller.transport == source.transport and tokens.caller.remote == source.remote
        )
        if tokens.caller is not None and not came_from_caller:
            return tokens.caller
        if came_from_caller and tokens.callee is not None:
            return tokens.callee
        binding = self.location.find_by_contact(request.uri)
        if binding is not None:
            return binding.flow
        if route_uri is None:
            raise SipError(481, "Call/Transaction Does Not Exist")
        raise SipError(404, "Not Found (dialog peer not registered)")

    def _route_tokens(self, route_uri: SipUri | None) -> RouteTokens:
        if route_uri is None:
            return RouteTokens(None, None)
        raw = route_uri.param(FLOW_TOKEN_PARAM) or ""
        parts = raw.split(".")
        caller = self.tokens.decode(parts[0]) if parts and parts[0] else None
        callee = self.tokens.decode(parts[1]) if len(parts) > 1 and parts[1] else None
        return RouteTokens(caller, callee)

    def _route_in_dialog(self, txn: ServerTransaction, route_uri: SipUri | None, now: float) -> None:
        request = txn.request
        self.worker_dialogs.request_seen(request, txn.flow)
        if request.get_all("Route"):
            raise SipError(403, "Route to an unknown destination")
        if route_uri is None and not self.trusted(txn.flow):
            proxy.check_loop(request, self.is_us)
        dest = self._dialog_destination(request, route_uri, txn.flow)
        if not self.trusted(txn.flow):
            proxy.strip_untrusted_identity(request)
        copy = request.copy()
        if self.trusted(dest):
            proxy.dtmf_info_as_relay(copy)  # the workers read keys sent by INFO in the dtmf-relay form
        ctx = ProxyContext(server=txn, record_routed=False, caller_flow=txn.flow)
        self._contexts[txn.id] = ctx
        self._forward(ctx, copy, dest, None, 0, now)

    def _forward_ack(self, ack: SipRequest, flow: Flow) -> None:
        """The ACK of a 2xx is forwarded statelessly along the dialog's route (RFC 3261 §16.11)."""
        try:
            route_uri = proxy.pop_our_route(ack, self.is_us)
            if ack.get_all("Route"):
                return
            dest = self._dialog_destination(ack, route_uri, flow)
        except SipError as e:
            log.info("dropped ACK", reason=e.reason)
            return
        proxy.decrement_max_forwards(ack)
        branch = proxy.stateless_branch(ack)
        ack.add(
            "Via",
            f"SIP/2.0/{dest.transport} {self.settings.host}:{self.settings.port};branch={branch};rport",
            first=True,
        )
        self.outbox.append(Send(ack.to_bytes(), dest))
        self.metrics.sip_forwarded.labels(kind="ack").inc()

    # -- CANCEL (RFC 3261 §16.10) ---------------------------------------------------------------

    def _on_cancel(self, cancel: SipRequest, flow: Flow, now: float) -> None:
        invite = self.transactions.find_invite_server_for_cancel(cancel)
        txn = self.transactions.receive_request(cancel, flow, now)
        if txn is None:
            return
        if invite is None:
            self._reply(txn, 481, "Call/Transaction Does Not Exist", now=now)
            return
        self._reply(txn, 200, now=now)
        ctx = self._contexts.get(invite.id)
        if ctx is None or ctx.answered:
            return
        ctx.cancelled = True
        reason = cancel.get("Reason")
        for branch in ctx.branches:
            self._cancel_branch(ctx, branch, now, reason=reason)

    def _cancel_branch(self, ctx: ProxyContext, branch: ProxyBranch, now: float, reason: str | None) -> None:
        """Send CANCEL for a pending INVITE branch, or remember to once it gets a provisional (§9.1)."""
        if branch.final is not None or branch.txn is None or not branch.txn.is_invite:
            return
        if branch.txn.state is TxState.TERMINATED:
            return
        if not branch.provisional:
            branch.cancel_pending = True
            return
        original = branch.request
        headers = [Header("Via", original.get_all("Via")[0])]
        for route in original.get_all("Route"):
            headers.append(Header("Route", route))
        headers += [
            Header("Max-Forwards", str(proxy.DEFAULT_MAX_FORWARDS)),
            Header("From", original.get("From") or ""),
            Header("To", original.get("To") or ""),
            Header("Call-ID", original.call_id),
            Header("CSeq", f"{original.cseq[0]} CANCEL"),
        ]
        if reason:
            headers.append(Header("Reason", reason))
        cancel = SipRequest("CANCEL", original.uri, headers)
        self.transactions.send_request(cancel, branch.flow, now, branch=branch.txn.branch, context=None)
        branch.cancel_pending = False
        branch.timer_c = None

    # -- responses (RFC 3261 §16.7) -------------------------------------------------------------

    def _on_response(self, response: SipResponse, flow: Flow, now: float) -> None:
        txn = self.transactions.receive_response(response, now)
        if txn is None:
            self._forward_response_stateless(response)

    def _forward_response_stateless(self, response: SipResponse) -> None:
        """A response that matches no transaction (a late 2xx retransmission): route it by Via."""
        vias = response.vias
        if len(vias) < 2 or not self.is_us(vias[0].host, vias[0].port):
            return
        response.pop_first_value("Via")
        self.outbox.append(Send(response.to_bytes(), self._via_flow(vias[1])))
        self.metrics.sip_forwarded.labels(kind="stateless_response").inc()

    @staticmethod
    def _via_flow(via: Via) -> Flow:
        """RFC 3261 §18.2.2 with RFC 3581: where a response to this Via goes."""
        host = via.param("received") or via.host
        rport = via.param("rport")
        port = int(rport) if rport and rport.isdigit() else (via.port or 5060)
        return Flow(via.transport, host, port)

    # TransactionUser ---------------------------------------------------------------------------

    def on_client_response(self, txn: ClientTransaction, response: SipResponse, now: float) -> None:
        context = txn.context
        if not isinstance(context, tuple):
            return  # our own CANCEL's response
        ctx, branch = context
        assert isinstance(ctx, ProxyContext) and isinstance(branch, ProxyBranch)
        status = response.status
        if status < 200:
            branch.provisional = True
            if branch.cancel_pending:
                self._cancel_branch(ctx, branch, now, reason=None)
            if status == 100:
                return
            if branch.timer_c is not None:
                self._arm_timer_c(ctx, branch, now + TIMER_C)  # RFC 3261 §16.7 step 2: reset by a 1xx
            if not ctx.answered and not ctx.cancelled:
                self._send_upstream(ctx, branch, response, now)
            return
        branch.timer_c = None
        self._timer_c.pop(id(branch), None)
        if 200 <= status < 300:
            first = branch.final is None
            branch.final = response
            deciding = not ctx.answered
            ctx.answered = True
            if first or ctx.server.is_invite:
                self._send_upstream(ctx, branch, response, now)
            if deciding and ctx.server.is_invite:
                for other in ctx.branches:
                    if other is not branch:
                        self._cancel_branch(ctx, other, now, reason=CALL_COMPLETED_ELSEWHERE)
            return
        branch.final = response
        if status >= 600 and not ctx.answered:
            for other in ctx.branches:
                if other is not branch:
                    self._cancel_branch(ctx, other, now, reason=None)
        self._maybe_finish(ctx, now)

    def on_client_timeout(self, txn: ClientTransaction, now: float) -> None:
        context = txn.context
        if not isinstance(context, tuple):
            return
        ctx, branch = context
        if branch.final is None:
            # Built from the forwarded copy: its top Via is ours and is dropped on the way up.
            if txn.transport_failed:
                branch.final = self._response(
                    branch.request, 480, "Temporarily Unavailable (device unreachable)"
                )
            else:
                branch.final = self._response(branch.request, 408, "Request Timeout")
        self._timer_c.pop(id(branch), None)
        self._maybe_finish(ctx, now)

    def on_server_ack_timeout(self, txn: ServerTransaction, now: float) -> None:
        log.info("no ACK for final response", status=txn.last_response and txn.last_response.status)

    def _maybe_finish(self, ctx: ProxyContext, now: float) -> None:
        """§16.7 step 6: once every branch has a final response, send the best one upstream."""
        if ctx.answered:
            self._contexts.pop(ctx.server.id, None)
            return
        if any(b.final is None for b in ctx.branches):
            return
        finals = [b for b in ctx.branches if b.final is not None]
        six = [b for b in finals if b.final is not None and b.final.status >= 600]
        chosen = six[0] if six else min(finals, key=lambda b: self._rank(b.final))
        assert chosen.final is not None
        ctx.answered = True
        response = chosen.final
        if response.status == 503 and not self.trusted(chosen.flow):
            # §16.7 step 6: a 503 from downstream must not make upstream think *we* are overloaded.
            # A media worker's 503 is ours: it means exactly that, and carries its Retry-After.
            response = response.copy()
            response.status, response.reason = 500, "Server Internal Error"
        self._send_upstream(ctx, chosen, response, now)
        self._contexts.pop(ctx.server.id, None)

    @staticmethod
    def _rank(response: SipResponse | None) -> tuple[int, int]:
        if response is None:
            return (9, 999)
        status = response.status
        # Prefer 4xx over 5xx over 3xx? RFC 3261 §16.7: lowest class wins, but 3xx of one branch is
        # less useful to a phone than a 486 of another; keep the RFC order with 408 least wanted.
        return (status // 100, 1 if status == 408 else 0)

    def _send_upstream(
        self, ctx: ProxyContext, branch: ProxyBranch, response: SipResponse, now: float
    ) -> None:
        """§16.7 steps 7-9: drop our Via, fix our Record-Route, send in the server transaction."""
        out = response.copy()
        out.pop_first_value("Via")
        if ctx.record_routed and out.status < 300:
            self._rewrite_record_route(out, ctx, branch)
            if out.status >= 200 and ctx.server.is_invite:
                self._track_worker_dialog(ctx, branch, response)
        self.metrics.sip_forwarded.labels(kind="response").inc()
        self.transactions.respond(ctx.server, out, now)

    def _track_worker_dialog(self, ctx: ProxyContext, branch: ProxyBranch, ok: SipResponse) -> None:
        """Remember a confirmed phone–worker dialog so the edge can end it if the worker dies."""
        invite = ctx.server.request
        if self.trusted(branch.flow) and not self.trusted(ctx.caller_flow):
            self.worker_dialogs.confirmed(
                invite, ok, phone=ctx.caller_flow, worker=branch.flow, phone_is_caller=True
            )
        elif self.trusted(ctx.caller_flow) and not self.trusted(branch.flow):
            self.worker_dialogs.confirmed(
                invite, ok, phone=branch.flow, worker=ctx.caller_flow, phone_is_caller=False
            )

    def end_worker_dialogs(self, host: str, port: int, now: float) -> int:
        """The worker at host:port died: send BYE to every phone still in a call with it."""
        byes = self.worker_dialogs.end_worker(
            host, port, via_host=self.settings.host, via_port=self.settings.port
        )
        for bye, flow in byes:
            self.transactions.send_request(bye, flow, now, branch=bye.top_via.branch or "", context=None)
        if byes:
            log.warning("ended calls of a failed media worker", worker=f"{host}:{port}", calls=len(byes))
        return len(byes)

    def _rewrite_record_route(self, response: SipResponse, ctx: ProxyContext, branch: ProxyBranch) -> None:
        """§16.7 step 4: our entry toward the caller names the caller's transport and both flows."""
        values = response.get_all("Record-Route")
        index = proxy.find_our_record_route(values, self.is_us)
        if index is None:
            return
        tokens = f"{self.tokens.encode(ctx.caller_flow)}.{self.tokens.encode(branch.flow)}"
        values[index] = proxy.record_route_value(
            self.settings.host,
            self.settings.port,
            ctx.caller_flow.transport,
            [(FLOW_TOKEN_PARAM, tokens)],
        )
        response.remove("Record-Route")
        for value in values:
            response.add("Record-Route", value)
