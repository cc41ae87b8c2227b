"""`softswitch serve` as a process: ports, HTTP endpoints, the embedded MQTT broker, clean stop."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import aiomqtt
import pytest

from softswitch import __version__
from tests.integration.helpers import SOFTSWITCH_EXE, launch_softswitch, running_softswitch, to_toml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Budget for one HTTP request to a local node.
HTTP_TIMEOUT_S = 5.0


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def test_ports_file_health_and_metrics(tmp_path: Path) -> None:
    with running_softswitch(tmp_path) as node:
        ports = json.loads((node.data_dir / "ports.json").read_text())
        assert ports == {"sip": node.sip_port, "http": node.http_port, "mqtt": node.mqtt_port}
        assert all(isinstance(p, int) and 0 < p < 65536 for p in ports.values())
        assert len(set(ports.values())) == 3

        status, content_type, body = _get(node.http_url("/healthz"))
        assert status == 200
        assert content_type.startswith("application/json")
        assert json.loads(body) == {"status": "ok", "version": __version__, "sip_port": node.sip_port}

        status, content_type, body = _get(node.http_url("/metrics"))
        assert status == 200
        assert content_type.startswith("text/plain")
        assert b"# TYPE softswitch_sip_requests_total counter" in body

        ready = [r for r in node.log_records() if r.get("event") == "softswitch ready"]
        assert ready, node.log_tail()
        assert (ready[0]["sip_port"], ready[0]["http_port"], ready[0]["mqtt_port"]) == (
            node.sip_port,
            node.http_port,
            node.mqtt_port,
        )


def test_logs_are_json_lines_with_utc_timestamps(tmp_path: Path) -> None:
    with running_softswitch(tmp_path) as node:
        _get(node.http_url("/healthz"))
    lines = [line for line in node.log_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)
        assert {"event", "level", "logger", "timestamp"} <= record.keys(), line
        assert record["timestamp"].endswith("Z"), line
    starting = next(json.loads(line) for line in lines if '"softswitch starting"' in line)
    assert starting["version"] == __version__
    assert starting["users"] == 4


async def test_embedded_broker_round_trip(tmp_path: Path) -> None:
    with running_softswitch(tmp_path) as node:
        assert node.mqtt_port is not None
        topic = "softswitch/v1/default/test/round-trip"
        async with asyncio.timeout(20):
            async with aiomqtt.Client("127.0.0.1", node.mqtt_port, identifier="test-round-trip") as client:
                await client.subscribe("softswitch/v1/default/test/#", qos=1)
                await client.publish(topic, b'{"hello": "world"}', qos=1)
                async for message in client.messages:
                    assert message.topic.matches(topic)
                    assert message.payload == b'{"hello": "world"}'
                    assert message.qos == 1
                    break


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    with running_softswitch(tmp_path) as node:
        ports_file = node.data_dir / "ports.json"
        assert ports_file.exists()
        started = time.monotonic()
        returncode = node.stop(sig, timeout_s=10)
        elapsed = time.monotonic() - started
        assert returncode == 0, node.log_tail()
        assert elapsed < 10, f"stopping took {elapsed:.1f} s\n{node.log_tail()}"
        assert not ports_file.exists(), "ports.json describes a running node: removed on stop"
        events = [r.get("event") for r in node.log_records()]
        # The orderly path ran to its end (a process killed by the signal would log neither).
        assert {"stop requested", "softswitch stopped"} <= set(events), node.log_tail()


def test_demo_config_applies_without_config_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {
        "SOFTSWITCH_SIP_LISTEN": "127.0.0.1:0",
        "SOFTSWITCH_HTTP_LISTEN": "127.0.0.1:0",
        "SOFTSWITCH_MQTT_URL": "embedded://127.0.0.1:0",
        "SOFTSWITCH_DATA_DIR": str(data_dir),
        "SOFTSWITCH_LOG_FORMAT": "json",
    }
    with launch_softswitch(["serve"], data_dir=data_dir, log_path=tmp_path / "out.log", env=env) as node:
        status, _, body = _get(node.http_url("/healthz"))
        assert status == 200
        assert json.loads(body)["sip_port"] == node.sip_port
        assert (data_dir / "softswitch.db").exists(), "the store follows data_dir when no store.url is set"
    output = node.log_text()
    assert "No --config given: running the demo configuration" in output
    for user in ("1001", "1002", "1003", "1004"):
        assert f'password = "demo{user}"' in output
    assert 'sid = "AC00000000000000000000000000demo"' in output


def test_busy_port_is_reported_without_traceback(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(
            to_toml(
                {
                    "data_dir": str(tmp_path / "data"),
                    "sip": {"listen": "127.0.0.1:0"},
                    "http": {"listen": f"127.0.0.1:{port}"},
                    "mqtt": {"url": "embedded://127.0.0.1:0"},
                    "log": {"format": "json"},
                }
            )
        )
        result = subprocess.run(
            [str(SOFTSWITCH_EXE), "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert "cannot start" in output
    assert "Address already in use" in output
    assert not (tmp_path / "data" / "ports.json").exists()
