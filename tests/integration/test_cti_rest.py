"""The CTI commands over REST against a running softswitch: HTTP Basic as an API account or as an agent,
the reply of each command with the HTTP status of its code, and the routes in the OpenAPI document."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DEMO_PASSWORDS
from tests.integration.helpers import RunningSoftswitch, running_softswitch
from tests.integration.peers import Sipp, free_port

pytestmark = pytest.mark.integration

SERVICE = ("AC00000000000000000000000000demo", "demo-token")  # the demo API account
AGENT = ("8001", "demo8001")
TIMEOUT_S = 10.0


def request(
    node: RunningSoftswitch,
    method: str,
    path: str,
    body: Any = None,
    auth: tuple[str, str] | None = SERVICE,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(node.http_url(path), data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), dict(err.headers)


@pytest.mark.timeout(90)
def test_agents_over_rest(tmp_path: Path, sipp: Sipp) -> None:
    with running_softswitch(tmp_path / "node") as node:
        registered = sipp.run(
            "register_digest", node.sip_port, local_port=free_port(),
            users=[("1001", DEMO_PASSWORDS["1001"])], sets={"expires": "300"}, timeout_s=30,
        )  # fmt: skip
        assert registered.ok, registered.describe()

        status, body, headers = request(node, "GET", "/v1/agents/8001", auth=None)
        assert status == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate", "")), body
        status, _, _ = request(node, "GET", "/v1/agents/8001", auth=("8001", "wrong"))
        assert status == 401

        # The agent logs itself in with its own credentials (no password in the body needed then).
        status, body, _ = request(node, "POST", "/v1/agents/8001/login", {}, auth=AGENT)
        assert (status, body["ok"], body["code"]) == (200, True, "ok"), body
        assert body["data"]["state"] == "ready", body
        status, body, _ = request(node, "GET", "/v1/agents/8002", auth=AGENT)
        assert (status, body["code"]) == (403, "not_permitted"), body

        # A service acts on any agent.
        status, body, _ = request(
            node, "POST", "/v1/agents/8001/set_state", {"state": "not_ready", "reason": "lunch"}
        )
        assert (status, body["ok"]) == (200, True), body
        status, body, _ = request(node, "GET", "/v1/agents/8001")
        assert (status, body["data"]["state"], body["data"]["reason"]) == (200, "not_ready", "lunch"), body

        status, body, _ = request(node, "POST", "/v1/agents/8001/set_state", {"state": "sleeping"})
        assert (status, body["code"]) == (400, "invalid_argument") and "state" in body["message"], body
        status, body, _ = request(node, "POST", "/v1/agents/8001/set_state", raw=b"[1, 2]")
        assert (status, body["ok"], body["code"]) == (400, False, "invalid_argument"), body
        status, body, _ = request(node, "GET", "/v1/agents/9999")
        assert (status, body["code"]) == (404, "unknown_agent"), body
        status, body, _ = request(node, "POST", "/v1/calls/hangup", {"agent_id": "8001"})
        assert (status, body["code"]) == (409, "no_active_call"), body
        status, _, _ = request(node, "POST", "/v1/calls/fly", {"agent_id": "8001"})
        assert status == 404

        status, body, _ = request(node, "POST", "/v1/agents/8001/logout", {})
        assert (status, body["ok"]) == (200, True), body
        status, body, _ = request(node, "GET", "/v1/agents/8001")
        assert body["data"]["state"] == "logged_out", body

        with urllib.request.urlopen(node.http_url("/openapi.json"), timeout=TIMEOUT_S) as response:
            paths = json.loads(response.read())["paths"]
        assert {"/v1/agents/{agent_id}", "/v1/agents/{agent_id}/{action}", "/v1/calls/{action}"} <= set(paths)
