"""The CTI commands over REST: `/v1/agents/…` and `/v1/calls/…` (documented in the node's OpenAPI).

Every route runs the same command handler as MQTT (EVENTS.md "Commands"); the response body is the
command's reply `{"ok", "code", "message", "data", "request_id"}` and the HTTP status follows its code
(`ok` 200, `invalid_argument` 400, `authentication_failed` 401, `not_permitted` 403, unknown agent, queue
or command 404, a state that does not allow it 409, `not_supported` 501, `internal` 500).

Authentication is HTTP Basic (RFC 7617): an API account's `sid:token` acts as a trusted service (any
agent); an agent's `id:password` acts as that agent (itself; a supervisor also on its team). Anything
else is 401 with a `WWW-Authenticate` challenge.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time, and their
# dependencies are local to add_cti_routes.
import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from softswitch.config import Config
from softswitch.cti.commands import Actor

Runner = Callable[[str, dict[str, Any], Actor], Awaitable[dict[str, Any]]]

STATUS_BY_CODE: Final = {
    "ok": 200,
    "invalid_argument": 400,
    "authentication_failed": 401,
    "not_permitted": 403,
    "unknown_agent": 404,
    "unknown_queue": 404,
    "unknown_command": 404,
    "agent_not_logged_in": 409,
    "already_logged_in": 409,
    "device_unavailable": 409,
    "invalid_state": 409,
    "no_active_call": 409,
    "not_supported": 501,
    "internal": 500,
}
AGENT_ACTIONS: Final = ("login", "logout", "set_state", "get_state")
CALL_ACTIONS: Final = (
    "originate", "answer", "hangup", "hold", "retrieve", "mute", "unmute", "send_dtmf", "transfer",
    "consult", "transfer_complete", "consult_cancel", "conference", "conference_leave", "monitor",
    "survey", "record",
)  # fmt: skip

_basic = HTTPBasic(auto_error=False, realm="softswitch")
CommandBody = Annotated[dict[str, Any] | None, Body(description="the command's JSON body (EVENTS.md)")]


def add_cti_routes(app: FastAPI, config: Config, run: Runner) -> None:
    """Mount the CTI routes on the node's HTTP app; `run(command, body, actor)` carries a command out."""
    accounts = {a.sid: a.token for a in config.api_accounts}
    agents = {a.id: a.password for a in config.agents}

    def actor(credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)]) -> Actor:
        if credentials is not None:
            user, secret = credentials.username, credentials.password
            token = accounts.get(user)
            if token is not None and hmac.compare_digest(token.encode(), secret.encode()):
                return Actor.service()
            password = agents.get(user)
            if password is not None and hmac.compare_digest(password.encode(), secret.encode()):
                return Actor.agent(user)
        raise HTTPException(
            401,
            detail="HTTP Basic credentials required: an API account (sid:token) or an agent (id:password)",
            headers={"WWW-Authenticate": 'Basic realm="softswitch"'},
        )

    router = APIRouter(prefix="/v1", tags=["cti"])

    async def respond(command: str, body: dict[str, Any], who: Actor) -> JSONResponse:
        reply = await run(command, body, who)
        return JSONResponse(reply, status_code=STATUS_BY_CODE.get(str(reply.get("code")), 500))

    @router.get("/agents/{agent_id}", summary="agent.get_state")
    async def get_agent(
        agent_id: Annotated[str, Path(max_length=64)], who: Annotated[Actor, Depends(actor)]
    ) -> JSONResponse:
        """The agent's state (EVENTS.md `agent.get_state`)."""
        return await respond("agent.get_state", {"agent_id": agent_id}, who)

    @router.post("/agents/{agent_id}/{action}", summary="agent.login / logout / set_state / get_state")
    async def agent_command(
        agent_id: Annotated[str, Path(max_length=64)],
        action: Annotated[str, Path(pattern="^(" + "|".join(AGENT_ACTIONS) + ")$")],
        who: Annotated[Actor, Depends(actor)],
        body: CommandBody = None,
    ) -> JSONResponse:
        """`agent.{action}` for the agent in the path; the body holds the command's other fields."""
        return await respond(f"agent.{action}", {**(body or {}), "agent_id": agent_id}, who)

    @router.post("/calls/{action}", summary="call.* commands")
    async def call_command(
        action: Annotated[str, Path(pattern="^(" + "|".join(CALL_ACTIONS) + ")$")],
        who: Annotated[Actor, Depends(actor)],
        body: CommandBody = None,
    ) -> JSONResponse:
        """`call.{action}` with the command's body (`agent_id` or `call_id`, and its own fields)."""
        return await respond(f"call.{action}", body or {}, who)

    app.include_router(router)

    async def invalid_body(request: Request, exc: Exception) -> Response:
        """A body that is not a JSON object gets the commands' own reply shape (not FastAPI's)."""
        if not request.url.path.startswith(("/v1/agents", "/v1/calls")) or not isinstance(
            exc, RequestValidationError
        ):
            return await request_validation_exception_handler(request, exc)  # type: ignore[arg-type]
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        )
        if any(tuple(e.get("loc", ()))[:2] == ("path", "action") for e in exc.errors()):
            code, message = "unknown_command", f"no such command: {request.url.path}"
        else:
            code, message = "invalid_argument", problems
        reply = {"ok": False, "code": code, "message": message, "data": {}, "request_id": None}
        return JSONResponse(reply, status_code=STATUS_BY_CODE[code])

    app.add_exception_handler(RequestValidationError, invalid_body)
