"""Dialogs between phones and media workers, as the edge sees them pass (RFC 3261 §12).

A media worker that dies cannot send BYE for its calls; without help the phones would keep a dead call up
until their users hang up. The edge records just enough of each confirmed worker dialog to end it towards
the phone itself: Call-ID, tags, the phone's target and flow, and the highest CSeq the phone has seen from
the worker's side (RFC 3261 §12.2.1.1: ours must be higher).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from softswitch.sip.flow import Flow
from softswitch.sip.message import Header, SipRequest, SipResponse, new_branch

#: Worker dialogs remembered at once; beyond, the oldest is forgotten (a lost BYE must not grow this).
MAX_TRACKED_DIALOGS = 20_000
#: Reason on the BYE the edge sends for a dead worker (RFC 3326; Q.850 41 = temporary failure).
WORKER_FAILED_REASON = 'Q.850;cause=41;text="media worker failed"'


@dataclass(slots=True)
class WorkerDialog:
    call_id: str
    worker: Flow
    phone: Flow
    phone_target: str  # the phone's Contact URI: Request-URI of requests to it
    local: str  # From of requests to the phone (the worker's side, with its tag)
    remote: str  # To of requests to the phone (the phone's side, with its tag)
    cseq: int  # highest CSeq of requests the phone received from the worker's side


def _with_tag(name_addr: str, tag: str | None) -> str:
    if tag is None or ";tag=" in name_addr.replace(" ", "").lower():
        return name_addr
    return f"{name_addr};tag={tag}"


class WorkerDialogs:
    """Confirmed dialogs with a worker on one side, keyed by Call-ID."""

    def __init__(self) -> None:
        self._dialogs: OrderedDict[str, WorkerDialog] = OrderedDict()

    def __len__(self) -> int:
        return len(self._dialogs)

    def confirmed(
        self, invite: SipRequest, ok: SipResponse, *, phone: Flow, worker: Flow, phone_is_caller: bool
    ) -> None:
        """A 2xx to an INVITE between `phone` and `worker` went through the edge."""
        from_value = invite.get("From") or ""
        to_value = _with_tag(invite.get("To") or "", ok.to.tag)
        if phone_is_caller:
            contacts = invite.contacts
            target = str(contacts[0].uri) if contacts else str(invite.from_.uri)
            local, remote, cseq = to_value, from_value, 0
        else:
            contacts = ok.contacts
            target = str(contacts[0].uri) if contacts else str(invite.uri)
            local, remote, cseq = from_value, to_value, invite.cseq[0]
        self._dialogs[ok.call_id] = WorkerDialog(ok.call_id, worker, phone, target, local, remote, cseq)
        self._dialogs.move_to_end(ok.call_id)
        while len(self._dialogs) > MAX_TRACKED_DIALOGS:
            self._dialogs.popitem(last=False)

    def worker_of(self, call_id: str) -> Flow | None:
        """The worker in the dialog `call_id`, if the edge knows it."""
        dialog = self._dialogs.get(call_id)
        return dialog.worker if dialog is not None else None

    def request_seen(self, request: SipRequest, source: Flow) -> None:
        """An in-dialog request passed: BYE ends the dialog; a worker's request raises the CSeq."""
        dialog = self._dialogs.get(request.get("Call-ID") or "")
        if dialog is None:
            return
        if request.method == "BYE":
            del self._dialogs[dialog.call_id]
            return
        if source == dialog.worker or (source.host, source.port) == (dialog.worker.host, dialog.worker.port):
            dialog.cseq = max(dialog.cseq, request.cseq[0])

    def end_worker(
        self, host: str, port: int, *, via_host: str, via_port: int
    ) -> list[tuple[SipRequest, Flow]]:
        """BYE requests, one per phone in a dialog with the worker at host:port; forgets those dialogs."""
        out: list[tuple[SipRequest, Flow]] = []
        for call_id, dialog in list(self._dialogs.items()):
            if (dialog.worker.host, dialog.worker.port) != (host, port):
                continue
            del self._dialogs[call_id]
            headers = [
                Header(
                    "Via",
                    f"SIP/2.0/{dialog.phone.transport} {via_host}:{via_port};branch={new_branch()};rport",
                ),
                Header("Max-Forwards", "70"),
                Header("From", dialog.local),
                Header("To", dialog.remote),
                Header("Call-ID", call_id),
                Header("CSeq", f"{dialog.cseq + 1} BYE"),
                Header("Reason", WORKER_FAILED_REASON),
            ]
            out.append((SipRequest("BYE", dialog.phone_target, headers), dialog.phone))
        return out
