"""Configuration: the CONTRACT.md shape, validation with file/line/key errors, overrides, the CLI."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from softswitch.config import (
    DEMO_CONFIG_TOML,
    SHIPPED_ROOT,
    Config,
    ConfigError,
    SipConfig,
    load_config,
    parse_config,
)
from tests.conftest import REPO_ROOT, SOFTSWITCH_EXE

pytestmark = pytest.mark.timeout(60)

#: The example of CONTRACT.md "Configuration (TOML)", verbatim (placeholders included).
CONTRACT_EXAMPLE = """\
data_dir = "./data"
tenant = "default"
dialplan = "dialplans/default.yaml"

[sip]
listen = "127.0.0.1:5060"          # edge, UDP and TCP
domain = "127.0.0.1"               # domain users register under
external_address = ""              # address put in SDP/Contact when behind NAT

[media]
workers = "auto"                   # PJSUA2 processes: one per core with the high-capacity engine;
                                   # with the fallback wheel, enough for max_calls. Capacity is probed.
max_calls = 512                    # calls (legs) the node accepts before answering 503
rtp_ports = "20000-29999"

[http]
listen = "127.0.0.1:8080"

[mqtt]
url = "embedded"                   # = "embedded://127.0.0.1:1883" (in-process broker on that address);
                                   # or "mqtt://host:1883", "mqtts://…" for an external broker
prefix = "softswitch/v1"

[store]
url = "sqlite:///./data/softswitch.db"   # or "postgresql://…"

[[users]]                          # SIP extensions that register
name = "1001"
password = "…"
display_name = "Alice"
permissions = ["internal"]         # "external" allows calls to trunks

[[agents]]
id = "8001"
name = "Agent One"
password = "…"
role = "agent"                     # or "supervisor"
extension = "1001"                 # default device
queues = ["support"]
wrap_up_s = 10

[[queues]]
id = "support"
strategy = "longest_idle"          # ring_all, round_robin, fewest_calls, random, skills
ring_timeout_s = 20
max_wait_s = 300

[[api_accounts]]                   # CPaaS REST API (seed): Basic auth AccountSid:AccountToken
sid = "…"
token = "…"
apps = ["…"]
callback_secret = "…"              # HMAC-SHA256 signature on webhooks

[[trunks]]                         # SIP gateways for external numbers
name = "pstn"
uri = "sip:gw.example:5060"
"""


def _problems(text: str, *, env: dict[str, str] | None = None, source: str = "t.toml") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text), source, env=env or {}, cwd=Path("/srv/node"))
    return caught.value.problems


# -- the shapes the product ships ---------------------------------------------------------------------


def test_demo_config_is_the_contract_demo(tmp_path: Path) -> None:
    config = load_config(None, env={}, cwd=tmp_path)
    assert [(u.name, u.password) for u in config.users] == [(f"100{i}", f"demo100{i}") for i in range(1, 5)]
    assert [(a.id, a.extension, a.queues) for a in config.agents] == [
        ("8001", "1001", ["support"]),
        ("8002", "1002", ["support"]),
    ]
    assert [q.id for q in config.queues] == ["support"]
    (account,) = config.api_accounts
    assert (account.sid, account.token, account.apps) == (
        "AC00000000000000000000000000demo",
        "demo-token",
        ["APdemo"],
    )
    assert (config.sip.listen_host, config.sip.listen_port) == ("127.0.0.1", 5060)
    assert (config.http.listen_host, config.http.listen_port) == ("127.0.0.1", 8080)
    assert (config.mqtt.embedded, config.mqtt.host, config.mqtt.port) == (True, "127.0.0.1", 1883)
    assert config.data_dir == tmp_path / "data"
    # Not found under the working directory: the dialplan shipped with the softswitch.
    assert config.dialplan == SHIPPED_ROOT / "dialplans" / "default.yaml"
    assert config.dialplan.exists()
    assert config.store.url == f"sqlite:///{tmp_path}/data/softswitch.db"


def test_contract_example_parses_with_every_field() -> None:
    config = parse_config(CONTRACT_EXAMPLE, "contract.toml", env={}, cwd=Path("/srv/node"))
    assert config.media.workers == "auto"
    assert (config.media.rtp_port_min, config.media.rtp_port_max) == (20000, 29999)
    assert config.store.url == "sqlite:////srv/node/data/softswitch.db"
    assert config.users[0].permissions == ["internal"]
    assert config.agents[0].wrap_up_s == 10
    assert config.queues[0].strategy == "longest_idle"
    assert config.trunks[0].uri == "sip:gw.example:5060"
    assert config.api_accounts[0].callback_secret == "…"


def test_docs_show_the_demo_config_verbatim() -> None:
    docs = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert DEMO_CONFIG_TOML in docs


def test_defaults_of_an_empty_file() -> None:
    config = parse_config("", "empty.toml", env={}, cwd=Path("/srv/node"))
    sip = config.sip
    assert (sip.min_expires, sip.max_expires, sip.default_expires) == (60, 7200, 3600)
    assert (sip.nonce_ttl_s, sip.auth_max_failures, sip.auth_failure_window_s, sip.auth_block_s) == (
        300,
        5,
        60,
        60,
    )
    assert sip.realm == sip.domain == "127.0.0.1"
    assert (config.log.level, config.log.format, config.log.sip_trace) == ("info", "auto", False)
    assert config.mqtt.prefix == "softswitch/v1"
    assert config.data_dir == Path("/srv/node/data")
    assert config.store.url == "sqlite:////srv/node/data/softswitch.db"
    assert config.users == []


def test_realm_can_differ_from_domain() -> None:
    assert SipConfig(domain="pbx.example", realm="users.example").realm == "users.example"
    assert SipConfig(domain="pbx.example").realm == "pbx.example"


def test_config_is_frozen() -> None:
    config = parse_config("", "x.toml", env={})
    with pytest.raises(ValidationError):
        config.tenant = "other"


def test_port_zero_is_accepted_everywhere_and_never_clashes() -> None:
    config = parse_config(
        """
        [sip]
        listen = "127.0.0.1:0"
        [http]
        listen = "127.0.0.1:0"
        [mqtt]
        url = "embedded://127.0.0.1:0"
        """,
        "zero.toml",
        env={},
    )
    assert (config.sip.listen_port, config.http.listen_port, config.mqtt.port) == (0, 0, 0)


def test_mqtt_urls() -> None:
    external = parse_config('[mqtt]\nurl = "mqtt://bus:s3cret@broker.local:1884"\n', "m.toml", env={})
    assert (external.mqtt.embedded, external.mqtt.host, external.mqtt.port) == (False, "broker.local", 1884)
    assert (external.mqtt.username, external.mqtt.password) == ("bus", "s3cret")
    assert "s3cret" not in str(external.summary())
    tls = parse_config('[mqtt]\nurl = "mqtts://broker.local"\n', "m.toml", env={})
    assert (tls.mqtt.tls, tls.mqtt.port) == (True, 8883)


def test_ipv6_listen() -> None:
    config = parse_config('[sip]\nlisten = "[::1]:5070"\n', "v6.toml", env={})
    assert (config.sip.listen_host, config.sip.listen_port) == ("::1", 5070)


def test_find_user() -> None:
    config = load_config(None, env={})
    user = config.find_user("1003")
    assert user is not None and user.password == "demo1003"
    assert config.find_user("1999") is None


# -- errors: every one names file, line and key path ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[users]]\nname = 1001\npassword = "x"\n',
            "t.toml:2: users[0].name: Input should be a valid string",
        ),
        ('[[users]]\nname = "1001"\n', "t.toml:1: users[0].password: Field required"),
        ('[[users]]\nname = "1001"\npassword = ""\n', "t.toml:3: users[0].password: must not be empty"),
        ('[[users]]\nname = "10 01"\npassword = "x"\n', "t.toml:2: users[0].name: must be 1-64 characters"),
        ('[[users]]\nname = "1001\\n"\npassword = "x"\n', "t.toml:2: users[0].name: must be 1-64 characters"),
        ('[[queues]]\nid = "sup/port"\n', "t.toml:2: queues[0].id: must be letters, digits"),
        (
            '[[users]]\nname = "1001"\npassword = "x"\npermissions = ["internal", "world"]\n',
            "t.toml:4: users[0].permissions[1]: Input should be 'internal' or 'external'",
        ),
        ('[sip]\nlisten = "127.0.0.1"\n', "t.toml:2: sip.listen: expected HOST:PORT"),
        ('[sip]\nlisten = "127.0.0.1:70000"\n', "t.toml:2: sip.listen: port 70000 is out of range 0-65535"),
        ("[sip]\nmin_expires = 0\n", "t.toml:2: sip.min_expires: Input should be greater than or equal to 1"),
        (
            "[sip]\nmin_expires = 5000\n",
            "t.toml:1: sip: expected min_expires <= default_expires <= max_expires",
        ),
        ('[sip]\nnonce_ttl_s = "300"\n', "t.toml:2: sip.nonce_ttl_s: Input should be a valid integer"),
        (
            '[sip]\nlisten = "127.0.0.1:5060"\nlisen = "x"\n',
            "t.toml:3: sip.lisen: Extra inputs are not permitted",
        ),
        ("[media]\nworkers = 0\n", 't.toml:2: media.workers: must be "auto" or an integer >= 1, got 0'),
        ('[media]\nworkers = "many"\n', 't.toml:2: media.workers: must be "auto" or an integer >= 1'),
        ('[media]\nrtp_ports = "29999-20000"\n', "t.toml:2: media.rtp_ports: first port 29999 must be below"),
        ('[media]\nrtp_ports = "80-2000"\n', "t.toml:2: media.rtp_ports: port 80 is outside 1024-65535"),
        ('[mqtt]\nurl = "amqp://x"\n', 't.toml:2: mqtt.url: expected "embedded"'),
        ('[mqtt]\nprefix = "a/#"\n', "t.toml:2: mqtt.prefix: must be a topic"),
        ('[store]\nurl = "mysql://db/x"\n', "t.toml:2: store.url: expected sqlite:///PATH or postgresql://"),
        (
            '[log]\nlevel = "loud"\n',
            "t.toml:2: log.level: Input should be 'debug', 'info', 'warning' or 'error'",
        ),
        ("[log]\nsip_trace = 1\n", "t.toml:2: log.sip_trace: Input should be a valid boolean"),
        ('tenant = "a/b"\n', "t.toml:1: tenant: must be letters, digits"),
        ("data_dir = 5\n", "t.toml:1: data_dir: expected a path (a non-empty string), got 5"),
        ('color = "red"\n', "t.toml:1: color: Extra inputs are not permitted"),
        ('[[queues]]\nid = "q"\nstrategy = "luck"\n', "t.toml:3: queues[0].strategy: Input should be"),
        ('[[trunks]]\nname = "pstn"\nuri = "gw.example"\n', "t.toml:3: trunks[0].uri: expected a SIP URI"),
        (
            '[[agents]]\nid = "8001"\npassword = "x"\nrole = "boss"\n',
            "t.toml:4: agents[0].role: Input should be",
        ),
        ('[[api_accounts]]\nsid = "AC1"\n', "t.toml:1: api_accounts[0].token: Field required"),
    ],
)
def test_validation_errors_name_file_line_and_key(text: str, expected: str) -> None:
    problems = _problems(text)
    assert any(p.startswith(expected) for p in problems), problems


def test_line_numbers_follow_array_of_tables_indices() -> None:
    text = """\
        [sip]
        domain = "127.0.0.1"

        [[users]]
        name = "1001"
        password = "a"

        [[users]]
        name = "1002"
        password = "b"

        [[users]]
        name = "1003"
        display_name = 7
        password = "c"
        """
    assert _problems(text) == ["t.toml:14: users[2].display_name: Input should be a valid string"]


def test_all_problems_are_reported_at_once() -> None:
    problems = _problems(
        """\
        [sip]
        listen = "nowhere"
        [media]
        workers = -1
        [[users]]
        name = 1001
        """
    )
    assert problems == [
        "t.toml:2: sip.listen: expected HOST:PORT (e.g. 127.0.0.1:5060), got 'nowhere'",
        't.toml:4: media.workers: must be "auto" or an integer >= 1, got -1',
        "t.toml:6: users[0].name: Input should be a valid string",
        "t.toml:5: users[0].password: Field required",
    ]


def test_cross_checks_are_located() -> None:
    problems = _problems(
        """\
        [[users]]
        name = "1001"
        password = "a"
        [[users]]
        name = "1001"
        password = "b"
        [[queues]]
        id = "support"
        [[agents]]
        id = "8001"
        password = "x"
        extension = "1009"
        queues = [
          "support",
          "sales",
        ]
        """
    )
    assert problems == [
        "t.toml:5: users[1].name: duplicate '1001' (also users[0])",
        "t.toml:12: agents[0].extension: no user named '1009' in [[users]]",
        "t.toml:13: agents[0].queues[1]: no queue 'sales' in [[queues]]",
    ]


def test_clashing_ports_are_rejected() -> None:
    problems = _problems('[sip]\nlisten = "127.0.0.1:8080"\n[http]\nlisten = "0.0.0.0:8080"\n')
    assert problems == ["t.toml:4: http.listen: port 8080 is also used by sip.listen"]
    problems = _problems('[mqtt]\nurl = "embedded://127.0.0.1:8080"\n')
    assert problems == ["t.toml:2: mqtt.url: port 8080 is also used by http.listen"]


def test_cross_checks_also_guard_programmatic_construction() -> None:
    with pytest.raises(ValidationError, match="no user named '1009'"):
        Config.model_validate({"agents": [{"id": "8001", "password": "x", "extension": "1009"}]})


def test_syntax_error_carries_the_line() -> None:
    problems = _problems(
        '[sip]\nlisten = "127.0.0.1:5060"\n[[users]]\nname = 1001\npassword =\n', source="bad.toml"
    )
    assert problems == ["bad.toml:5: TOML syntax error: Invalid value (column 11)"]


def test_syntax_error_at_end_of_file() -> None:
    (problem,) = _problems('[sip]\nlisten = "127.0.0.1:5060')
    assert problem.startswith("t.toml:2: TOML syntax error:")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.toml", env={})
    assert caught.value.problems == [f"{tmp_path / 'missing.toml'}: cannot read: No such file or directory"]


# -- environment overrides -------------------------------------------------------------------------------


def test_env_overrides_apply_before_validation(tmp_path: Path) -> None:
    env = {
        "SOFTSWITCH_SIP_LISTEN": "127.0.0.1:0",
        "SOFTSWITCH_HTTP_LISTEN": "127.0.0.1:18080",
        "SOFTSWITCH_MQTT_URL": "mqtt://broker.local:1884",
        "SOFTSWITCH_STORE_URL": "postgresql://softswitch@db.local/softswitch",
        "SOFTSWITCH_DATA_DIR": "var/lib",
        "SOFTSWITCH_TENANT": "1001",  # a string field keeps the text even though it reads as a number
        "SOFTSWITCH_MEDIA_WORKERS": "4",
        "SOFTSWITCH_LOG_SIP_TRACE": "true",
        "SOFTSWITCH_SIP_MIN_EXPIRES": "1",
        "SOFTSWITCH_CACHE": "/not/config",  # not a config section: ignored
        "PATH": "/usr/bin",
    }
    config = load_config(None, env=env, cwd=tmp_path)
    assert config.sip.listen_port == 0
    assert config.http.listen_port == 18080
    assert (config.mqtt.embedded, config.mqtt.host, config.mqtt.port) == (False, "broker.local", 1884)
    assert config.store.url == "postgresql://softswitch@db.local/softswitch"
    assert config.data_dir == tmp_path / "var" / "lib"
    assert config.tenant == "1001"
    assert config.media.workers == 4
    assert config.log.sip_trace is True
    assert config.sip.min_expires == 1
    assert len(config.users) == 4


def test_env_data_dir_moves_the_default_store(tmp_path: Path) -> None:
    config = load_config(None, env={"SOFTSWITCH_DATA_DIR": str(tmp_path / "d")})
    assert config.store.url == f"sqlite:///{tmp_path}/d/softswitch.db"


def test_env_errors_name_the_variable() -> None:
    problems = _problems("", env={"SOFTSWITCH_MEDIA_WORKERS": "0", "SOFTSWITCH_SIP_LISTN": "x:1"})
    assert problems == [
        "environment SOFTSWITCH_SIP_LISTN: sip.listn: Extra inputs are not permitted",
        'environment SOFTSWITCH_MEDIA_WORKERS: media.workers: must be "auto" or an integer >= 1, got 0',
    ]


# -- the command line ----------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SOFTSWITCH_EXE), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_cli_check_config_ok(tmp_path: Path, softswitch_exe: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(CONTRACT_EXAMPLE, encoding="utf-8")
    result = _cli("check-config", str(good))
    assert (result.returncode, result.stdout.strip()) == (0, f"{good}: ok")


def test_cli_check_config_rejects_broken_file(tmp_path: Path, softswitch_exe: Path) -> None:
    (tmp_path / "bad.toml").write_text(
        '[sip]\nlisten = "127.0.0.1:5060"\n[[users]]\nname = 1001\npassword =\n'
    )
    result = _cli("check-config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "bad.toml:5: TOML syntax error: Invalid value (column 11)"
    (tmp_path / "bad.toml").write_text(
        '[sip]\nlisten = "127.0.0.1:5060"\n[[users]]\nname = 1001\npassword = "x"\n'
    )
    result = _cli("check-config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "bad.toml:4: users[0].name: Input should be a valid string"


def test_cli_check_config_missing_file(tmp_path: Path, softswitch_exe: Path) -> None:
    result = _cli("check-config", "nope.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert "nope.toml: cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_serve_with_bad_config_exits_2_without_traceback(tmp_path: Path, softswitch_exe: Path) -> None:
    (tmp_path / "bad.toml").write_text("[media]\nworkers = 0\n")
    result = _cli("serve", "--config", "bad.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert 'bad.toml:2: media.workers: must be "auto"' in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_version_and_usage(softswitch_exe: Path) -> None:
    from softswitch import __version__

    result = _cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"softswitch {__version__}")
    result = _cli()
    assert result.returncode == 2
    assert "usage: softswitch" in result.stderr


def test_env_values_are_cross_checked_too() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"SOFTSWITCH_HTTP_LISTEN": "127.0.0.1:5060"})
    assert caught.value.problems == [
        "environment SOFTSWITCH_HTTP_LISTEN: http.listen: port 5060 is also used by sip.listen"
    ]


# -- the configuration the integration tests run with (tests/integration/helpers.py) --------------------


def test_integration_test_config_is_valid_and_merges_extras(tmp_path: Path) -> None:
    from tests.integration.helpers import node_config, to_toml

    plain = parse_config(to_toml(node_config(tmp_path)), "node.toml", env={})
    assert [u.name for u in plain.users] == ["1001", "1002", "1003", "1004"]
    assert (plain.sip.listen_port, plain.http.listen_port, plain.mqtt.port) == (0, 0, 0)
    assert plain.data_dir == tmp_path / "data"

    extra = '[sip]\nmin_expires = 1\n[log]\nsip_trace = true\n[[users]]\nname = "2001"\npassword = "pw"\n'
    merged = parse_config(to_toml(node_config(tmp_path, extra)), "node.toml", env={})
    assert (merged.sip.min_expires, merged.sip.listen_port, merged.log.sip_trace) == (1, 0, True)
    assert [u.name for u in merged.users] == ["2001"]
    assert merged.agents == [], "demo agents on users that are gone are dropped"
