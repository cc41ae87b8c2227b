"""The node's configuration: TOML (CONTRACT.md) parsed into frozen, validated objects.

`load_config(path)` reads a file (or, with no path, the demo configuration), applies the environment
overrides `SOFTSWITCH_<SECTION>_<KEY>` and validates everything at once. Every problem found is reported
as `FILE:LINE: key.path: reason` in one `ConfigError`, so an operator fixes a file in one pass.

The objects are passed to whoever needs them (STYLE.md 8); nothing here is global.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

#: Shown instead of a file name when no `--config` is given.
DEMO_SOURCE = "<demo config>"

#: Where the files shipped beside the package live (`dialplans/`).
SHIPPED_ROOT = Path(__file__).resolve().parent.parent

#: The configuration that applies without `--config` (CONTRACT.md). Passwords are public: it is a demo.
DEMO_CONFIG_TOML = """\
# softswitch demo configuration: what `softswitch serve` runs without --config.
# The passwords below are published in the README: never expose a node running this file.
data_dir = "./data"
tenant = "default"
dialplan = "dialplans/default.yaml"

[sip]
listen = "127.0.0.1:5060"          # edge, UDP and TCP
domain = "127.0.0.1"               # domain users register under
external_address = ""              # address put in SDP/Contact when behind NAT

[media]
workers = "auto"
max_calls = 512
rtp_ports = "20000-29999"

[http]
listen = "127.0.0.1:8080"

[mqtt]
url = "embedded"                   # in-process broker on 127.0.0.1:1883
prefix = "softswitch/v1"

[store]
# url = "sqlite:///./data/softswitch.db"   # the default: sqlite:///{data_dir}/softswitch.db

[log]
level = "info"
format = "auto"                    # console on a terminal, JSON otherwise

[prompts]
language = "en"                    # the shipped set: "en" or "zh"; dir = "./prompts" adds your recordings

[[users]]
name = "1001"
password = "demo1001"
display_name = "Alice"

[[users]]
name = "1002"
password = "demo1002"
display_name = "Bob"

[[users]]
name = "1003"
password = "demo1003"
display_name = "Carol"

[[users]]
name = "1004"
password = "demo1004"
display_name = "Dave"

[[agents]]
id = "8001"
name = "Agent One"
password = "demo8001"
role = "agent"
extension = "1001"
queues = ["support"]
wrap_up_s = 10

[[agents]]
id = "8002"
name = "Agent Two"
password = "demo8002"
role = "agent"
extension = "1002"
queues = ["support"]
wrap_up_s = 10

[[queues]]
id = "support"
strategy = "longest_idle"
ring_timeout_s = 20
max_wait_s = 300
announce_position_s = 30

[[api_accounts]]
sid = "AC00000000000000000000000000demo"
token = "demo-token"
apps = ["APdemo"]
callback_secret = "demo-callback-secret"
"""

#: Prefix of the environment overrides (CONTRACT.md "CLI").
ENV_PREFIX = "SOFTSWITCH_"
#: Sections an environment variable can override; any other `SOFTSWITCH_*` variable is not config
#: (build scripts use e.g. `SOFTSWITCH_CACHE`) and is left alone.
ENV_SECTIONS = ("sip", "media", "http", "mqtt", "store", "log")
#: Top-level scalar keys an environment variable can override.
ENV_TOP_LEVEL = ("data_dir", "tenant", "dialplan")

#: Default port of the embedded MQTT broker and of `mqtt://` URLs (IANA registration for MQTT).
MQTT_DEFAULT_PORT = 1883
#: Default port of `mqtts://` URLs (IANA registration for MQTT over TLS).
MQTTS_DEFAULT_PORT = 8883
#: RTP ports must stay out of the privileged range (< 1024): media workers do not run as root.
RTP_PORT_FLOOR = 1024
#: Longest SIP user name accepted: a user part is also an MQTT topic level and a SQL key.
MAX_USER_NAME_LENGTH = 64
#: Longest registration interval accepted (RFC 3261 §10.2.1.1 sets no limit; one day bounds stale bindings).
MAX_EXPIRES_LIMIT = 86_400

# The user part of a SIP URI as this node accepts it for its own users: RFC 3261 §25.1 "unreserved"
# characters that need no escaping anywhere (URI, MQTT topic level, file name), plus "+" for E.164.
_USER_NAME_RE = re.compile(r"[A-Za-z0-9._~+-]+")
# A tenant or queue id appears in MQTT topics (EVENTS.md): no separators, no wildcards.
_TOPIC_LEVEL_RE = re.compile(r"[A-Za-z0-9._~-]+")


class ConfigError(Exception):
    """A configuration that cannot be used. `problems` holds one `FILE:LINE: key.path: reason` each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# -- helpers shared by the models -------------------------------------------------------------------


def parse_host_port(value: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:5060`); the port may be 0 (pick a free one)."""
    match = re.fullmatch(
        r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<port>\d{1,5})|(?P<host>[^:\[\]\s]+):(?P<p>\d{1,5})", value
    )
    if match is None:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:5060), got {value!r}")
    host = match.group("v6") or match.group("host")
    port = int(match.group("port") or match.group("p"))
    if match.group("v6"):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


def _cwd(info: ValidationInfo) -> Path:
    context = info.context if isinstance(info.context, dict) else {}
    cwd = context.get("cwd")
    return Path(cwd) if cwd is not None else Path.cwd()


def _to_path(value: Any) -> Path:
    """TOML has no path type: a path is a non-empty string."""
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return Path(value)
    raise ValueError(f"expected a path (a non-empty string), got {value!r}")


PathField = Annotated[Path, BeforeValidator(_to_path)]


class _Model(BaseModel):
    """Frozen, strict (no silent type coercion), unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class _Listener(_Model):
    """A section with a `listen = "HOST:PORT"` address."""

    listen: str

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @property
    def listen_host(self) -> str:
        return parse_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_host_port(self.listen)[1]


# -- sections ---------------------------------------------------------------------------------------


DigestAlgorithm = Literal["SHA-256", "MD5"]


def _md5_only() -> list[DigestAlgorithm]:
    return ["MD5"]


class SipConfig(_Listener):
    """The SIP edge (UDP and TCP share `listen`) and its registrar and digest-auth tunables."""

    listen: str = "127.0.0.1:5060"
    domain: str = "127.0.0.1"
    external_address: str = ""
    #: Digest realm (RFC 3261 §22.1); defaults to the domain.
    realm: str = ""
    #: RFC 3261 §10.3 step 7: shorter requested intervals get 423 Interval Too Brief with Min-Expires.
    min_expires: int = Field(default=60, ge=1, le=MAX_EXPIRES_LIMIT)
    #: Longer requested intervals are shortened to this (RFC 3261 §10.3 step 7 allows it).
    max_expires: int = Field(default=7200, ge=1, le=MAX_EXPIRES_LIMIT)
    #: Interval granted when the REGISTER names none (RFC 3261 §10.2.1.1 suggests 3600 s).
    default_expires: int = Field(default=3600, ge=1, le=MAX_EXPIRES_LIMIT)
    #: Lifetime of a digest nonce before the client is asked again with stale=true (RFC 7616 §3.3).
    nonce_ttl_s: int = Field(default=300, ge=1)
    #: Failed digest attempts per source and user within the window before a temporary 403.
    auth_max_failures: int = Field(default=5, ge=1)
    auth_failure_window_s: int = Field(default=60, ge=1)
    auth_block_s: int = Field(default=60, ge=1)
    #: Digest algorithms offered, one challenge each, in this order (RFC 7616 §3.7). MD5 alone by
    #: default: baresip 1.0.0 fails on any SHA-256 challenge and SIPp 3.6.1 reads only the first one.
    digest_algorithms: list[DigestAlgorithm] = Field(default_factory=_md5_only, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _realm_defaults_to_domain(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("realm"):
            domain = data.get("domain")
            data = dict(data)
            data["realm"] = domain if isinstance(domain, str) else cls.model_fields["domain"].default
        return data

    @field_validator("domain", "realm")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _expires_order(self) -> Self:
        if not self.min_expires <= self.default_expires <= self.max_expires:
            raise ValueError(
                "expected min_expires <= default_expires <= max_expires, got "
                f"{self.min_expires} / {self.default_expires} / {self.max_expires}"
            )
        return self


class MediaConfig(_Model):
    """The media plane: PJSUA2 worker processes and their RTP port range (ARCHITECTURE.md)."""

    workers: Literal["auto"] | int = "auto"
    #: Legs the node holds before new calls get 503 (a bridged call is two legs).
    max_calls: int = Field(default=512, ge=2)
    #: New calls per second admitted from phones (a token bucket with one second of burst); beyond it
    #: calls get 503 with Retry-After before they reach a worker. About 20 calls/s complete cleanly on
    #: 2 cores with events and CDRs (docs/performance.md): the default keeps headroom.
    max_cps: float = Field(default=15.0, gt=0)
    rtp_ports: str = "20000-29999"

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f'must be "auto" or an integer >= 1, got {value!r}')

    @field_validator("rtp_ports")
    @classmethod
    def _check_rtp_ports(cls, value: str) -> str:
        _parse_port_range(value)
        return value

    @property
    def rtp_port_min(self) -> int:
        return _parse_port_range(self.rtp_ports)[0]

    @property
    def rtp_port_max(self) -> int:
        return _parse_port_range(self.rtp_ports)[1]


def _parse_port_range(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", value)
    if match is None:
        raise ValueError(f"expected FIRST-LAST (e.g. 20000-29999), got {value!r}")
    low, high = int(match.group(1)), int(match.group(2))
    for port in (low, high):
        if not RTP_PORT_FLOOR <= port <= 65535:
            raise ValueError(f"port {port} is outside {RTP_PORT_FLOOR}-65535")
    if low >= high:
        raise ValueError(f"first port {low} must be below last port {high}")
    return low, high


class HttpConfig(_Listener):
    """REST, WebSocket, /healthz and /metrics."""

    listen: str = "127.0.0.1:8080"


class MqttConfig(_Model):
    """The MQTT bus: `embedded` (an in-process broker) or an external broker URL."""

    url: str = "embedded"
    prefix: str = "softswitch/v1"

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        _split_mqtt_url(value)
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "+#\0"):
            raise ValueError("must be a topic like softswitch/v1: no wildcards, no leading or trailing '/'")
        return value

    @property
    def embedded(self) -> bool:
        return _split_mqtt_url(self.url)[0] == "embedded"

    @property
    def tls(self) -> bool:
        return _split_mqtt_url(self.url)[0] == "mqtts"

    @property
    def host(self) -> str:
        return _split_mqtt_url(self.url)[1]

    @property
    def port(self) -> int:
        return _split_mqtt_url(self.url)[2]

    @property
    def username(self) -> str | None:
        return _url_parts(self.url).username

    @property
    def password(self) -> str | None:
        return _url_parts(self.url).password


def _url_parts(url: str) -> SplitResult:
    return urlsplit("embedded://127.0.0.1" if url == "embedded" else url)


def _split_mqtt_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of `embedded`, `embedded://H:P`, `mqtt://[u[:p]@]H[:P]`, `mqtts://…`."""
    if url == "embedded":
        return "embedded", "127.0.0.1", MQTT_DEFAULT_PORT
    parts = urlsplit(url)
    if parts.scheme not in ("embedded", "mqtt", "mqtts"):
        raise ValueError(
            f'expected "embedded", embedded://HOST:PORT, mqtt://HOST:PORT or mqtts://…, got {url!r}'
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"unexpected path or query in {url!r}")
    if parts.scheme == "embedded" and (parts.username or parts.password):
        raise ValueError("the embedded broker takes no credentials")
    if port is None:
        port = MQTTS_DEFAULT_PORT if parts.scheme == "mqtts" else MQTT_DEFAULT_PORT
    return parts.scheme, parts.hostname, port


class StoreConfig(_Model):
    """Where CDRs, bindings and outboxes live: SQLite (default, under data_dir) or PostgreSQL."""

    #: Filled from data_dir (`sqlite:///{data_dir}/softswitch.db`) when the file names none.
    url: str = ""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("sqlite:///"):
            path = value.removeprefix("sqlite:///")
            if not path:
                raise ValueError("sqlite URL names no file: sqlite:///path/to/softswitch.db")
            if path != ":memory:" and not Path(path).is_absolute():
                return "sqlite:///" + str((_cwd(info) / path).resolve())
            return value
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme.split("+", 1)[0] in ("postgresql", "postgres") and urlsplit(value).hostname:
            return value
        raise ValueError(f"expected sqlite:///PATH or postgresql://…, got {_redact_url(value)!r}")


class LogConfig(_Model):
    """Log verbosity and rendering; `sip_trace` logs every SIP message the edge sends or receives."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    sip_trace: bool = False


class PromptsConfig(_Model):
    """The prompt set played to callers: the shipped English or Mandarin set, and the operator's own
    recordings (`dir`, same names, searched first: `{dir}/{language}/NAME.wav`, then `{dir}/NAME.wav`)."""

    language: Literal["en", "zh"] = "en"
    dir: PathField | None = None

    @field_validator("dir")
    @classmethod
    def _resolve_dir(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        resolved = value if value.is_absolute() else (_cwd(info) / value).resolve()
        if not resolved.is_dir():
            raise ValueError(f"{str(resolved)!r} is not a directory")
        return resolved


Permission = Literal["internal", "external"]


def _default_permissions() -> list[Permission]:
    return ["internal"]


class UserConfig(_Model):
    """A SIP extension that registers (its AOR is `sip:{name}@{sip.domain}`)."""

    name: str
    password: str
    display_name: str = ""
    #: "internal" calls other users; "external" may also call out through trunks.
    permissions: list[Permission] = Field(default_factory=_default_permissions)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value or len(value) > MAX_USER_NAME_LENGTH or not _USER_NAME_RE.fullmatch(value):
            raise ValueError(
                f"must be 1-{MAX_USER_NAME_LENGTH} characters usable in a SIP URI user part "
                f"(letters, digits, '.', '_', '~', '+', '-'), got {value!r}"
            )
        return value

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value


#: Highest skill level an agent can have or a queue can require (levels run 1..MAX_SKILL_LEVEL).
MAX_SKILL_LEVEL = 100
#: Reasons the system itself gives (`not_ready` after a missed offer, `offline`): not for configured reasons.
SYSTEM_NOT_READY_REASONS = ("no_answer", "device_unregistered")

# A skill name or a not-ready reason: a lowercase word (it appears in events and in command bodies).
_WORD_RE = re.compile(r"[a-z0-9][a-z0-9_]*")
# Where the dialplan sends a caller leaving a queue: a number or extension the dialplan routes.
_DESTINATION_RE = re.compile(r"[A-Za-z0-9*#+._-]+")


def _check_skills(value: dict[str, int]) -> dict[str, int]:
    for name, level in value.items():
        if not _WORD_RE.fullmatch(name):
            raise ValueError(f"skill names are lowercase words (a-z, 0-9, '_'), got {name!r}")
        if not 1 <= level <= MAX_SKILL_LEVEL:
            raise ValueError(f"skill {name!r}: level must be 1-{MAX_SKILL_LEVEL}, got {level}")
    return value


class AgentConfig(_Model):
    """A contact-centre agent (CTI): logs in on a device and takes calls from queues."""

    id: str
    name: str = ""
    password: str
    role: Literal["agent", "supervisor"] = "agent"
    #: The user whose phone the agent uses by default; must name a configured user.
    extension: str | None = None
    queues: list[str] = Field(default_factory=list)
    #: Seconds in wrap_up after a call before the agent is offered the next one.
    wrap_up_s: int = Field(default=10, ge=0)
    #: Skills and their levels (1-100): queues with `skills` offer calls only to agents at or above them.
    skills: dict[str, int] = Field(default_factory=dict)
    #: Ask the device to answer offered calls by itself (the seed's setApiCallAutoAnswer).
    auto_answer: bool = False
    #: State after login when the login names none (seed: initialState).
    initial_state: Literal["ready", "not_ready"] = "ready"
    #: Supervisors only: the agents this supervisor may act on (log out, set state, monitor, hang up).
    team: list[str] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return _check_topic_level(value)

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("skills")
    @classmethod
    def _check_skills(cls, value: dict[str, int]) -> dict[str, int]:
        return _check_skills(value)

    @model_validator(mode="after")
    def _team_is_for_supervisors(self) -> Self:
        if self.team and self.role != "supervisor":
            raise ValueError(f'team: only a supervisor has a team (role is "{self.role}")')
        return self


QueueStrategy = Literal["longest_idle", "ring_all", "round_robin", "fewest_calls", "random", "skills"]


class QueueConfig(_Model):
    """An ACD queue."""

    id: str
    strategy: QueueStrategy = "longest_idle"
    #: Seconds an offered agent rings before the offer moves on.
    ring_timeout_s: int = Field(default=20, ge=1)
    #: Seconds a caller waits in the queue before leaving it with reason "timeout".
    max_wait_s: int = Field(default=300, ge=1)
    #: Most callers waiting at once; a caller beyond it goes to `overflow` at once. 0: no limit.
    max_length: int = Field(default=0, ge=0)
    #: Where callers go after `max_wait_s` or when the queue is full; none: the call is ended.
    overflow: str | None = None
    #: Where a new caller goes when no agent of the queue is logged in; none: the caller waits.
    no_agents: str | None = None
    #: Agents need each of these skills at this level or above to be offered this queue's calls.
    skills: dict[str, int] = Field(default_factory=dict)
    #: An agent in several queues is offered the callers of the highest priority queue first.
    priority: int = 0
    #: Wrap-up seconds after this queue's calls; none: the agent's own `wrap_up_s`.
    wrap_up_s: int | None = Field(default=None, ge=0)
    #: `service_level` in queue.stats counts the callers answered within this many seconds.
    service_level_s: int = Field(default=20, ge=1)
    #: A key (0-9, *, #) a waiting caller presses to leave the queue; none: callers cannot leave by key.
    exit_key: str | None = None
    #: Where a caller who pressed `exit_key` goes (a number the dialplan routes); none: the call is ended.
    exit_to: str | None = None
    #: Every this many seconds a waiting caller hears its place in the queue ("you are caller number 2",
    #: prompts `queue_position` and `digit_N`), then the music again. 0: never.
    announce_position_s: int = Field(default=0, ge=0)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return _check_topic_level(value)

    @field_validator("exit_key")
    @classmethod
    def _check_exit_key(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 1 or value not in "0123456789*#"):
            raise ValueError(f"expected one key of 0-9, * or #, got {value!r}")
        return value

    @field_validator("overflow", "no_agents", "exit_to")
    @classmethod
    def _check_destination(cls, value: str | None) -> str | None:
        if value is not None and not _DESTINATION_RE.fullmatch(value):
            raise ValueError(
                f"expected a number the dialplan routes (letters, digits, '*', '#', '+', '.', '_', '-'), "
                f"got {value!r}"
            )
        return value

    @field_validator("skills")
    @classmethod
    def _check_skills(cls, value: dict[str, int]) -> dict[str, int]:
        return _check_skills(value)

    @model_validator(mode="after")
    def _skills_strategy_needs_skills(self) -> Self:
        if self.strategy == "skills" and not self.skills:
            raise ValueError(
                'strategy "skills" needs the skills the queue requires (skills = {name = level})'
            )
        return self


def _default_not_ready_reasons() -> list[str]:
    return ["busy", "break", "lunch", "meeting", "training"]


class CtiConfig(_Model):
    """Contact-centre settings shared by every agent and queue."""

    #: Reasons an agent may give for not_ready (the seed's pause causes; 小休 is "break").
    not_ready_reasons: list[str] = Field(default_factory=_default_not_ready_reasons, min_length=1)
    #: The reason used when a not_ready request names none.
    default_not_ready_reason: str = "busy"
    #: An offer that is not answered puts the agent in not_ready with reason no_answer (the seed's
    #: 呼入非接通挂断置忙); false: the agent stays ready and the next agent is tried.
    no_answer_not_ready: bool = True

    @field_validator("not_ready_reasons")
    @classmethod
    def _check_reasons(cls, value: list[str]) -> list[str]:
        for reason in value:
            if not _WORD_RE.fullmatch(reason):
                raise ValueError(f"reasons are lowercase words (a-z, 0-9, '_'), got {reason!r}")
            if reason in SYSTEM_NOT_READY_REASONS:
                raise ValueError(f"{reason!r} is a reason the system gives; choose another name")
        if len(set(value)) != len(value):
            raise ValueError("a reason is listed twice")
        return value

    @model_validator(mode="after")
    def _default_is_listed(self) -> Self:
        if self.default_not_ready_reason not in self.not_ready_reasons:
            raise ValueError(
                f"default_not_ready_reason {self.default_not_ready_reason!r} is not in not_ready_reasons"
            )
        return self


class ApiAccountConfig(_Model):
    """An account of the CPaaS REST API (Basic auth `sid:token`)."""

    sid: str
    token: str
    #: Application sids the account may use (click-to-call paths name one).
    apps: list[str] = Field(default_factory=list)
    #: Key of the HMAC-SHA256 signature on webhooks; empty sends them unsigned.
    callback_secret: str = ""

    @field_validator("sid", "token")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty")
        return value


class TrunkConfig(_Model):
    """A SIP gateway for external numbers."""

    name: str
    uri: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _check_topic_level(value)

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        if not re.fullmatch(r"sips?:[^\s@]+(@[^\s]+)?", value):
            raise ValueError(f"expected a SIP URI such as sip:gw.example:5060, got {value!r}")
        return value


def _check_topic_level(value: str) -> str:
    if not _TOPIC_LEVEL_RE.fullmatch(value):
        raise ValueError(
            f"must be letters, digits, '.', '_', '~' or '-' (it appears in MQTT topics), got {value!r}"
        )
    return value


# -- the whole configuration ------------------------------------------------------------------------


class Config(_Model):
    """One node's configuration (CONTRACT.md "Configuration")."""

    data_dir: PathField = Field(default=Path("data"), validate_default=True)
    tenant: str = "default"
    dialplan: PathField = Field(default=Path("dialplans/default.yaml"), validate_default=True)
    sip: SipConfig = Field(default_factory=SipConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    cti: CtiConfig = Field(default_factory=CtiConfig)
    users: list[UserConfig] = Field(default_factory=list)
    agents: list[AgentConfig] = Field(default_factory=list)
    queues: list[QueueConfig] = Field(default_factory=list)
    api_accounts: list[ApiAccountConfig] = Field(default_factory=list)
    trunks: list[TrunkConfig] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _store_defaults_to_data_dir(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        store = data.get("store", {})
        if isinstance(store, dict) and not store.get("url"):
            data_dir = data.get("data_dir", "data")
            if isinstance(data_dir, str | Path):
                data = dict(data)
                data["store"] = {**store, "url": f"sqlite:///{Path(data_dir) / 'softswitch.db'}"}
        return data

    @field_validator("data_dir", "dialplan")
    @classmethod
    def _resolve(cls, value: Path, info: ValidationInfo) -> Path:
        if value.is_absolute():
            return value
        resolved = (_cwd(info) / value).resolve()
        if info.field_name == "dialplan" and not resolved.exists():
            # A relative dialplan not found from here names one of the dialplans shipped with the
            # softswitch (`dialplans/default.yaml` from any working directory).
            shipped = (SHIPPED_ROOT / value).resolve()
            if shipped.exists():
                return shipped
        return resolved

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, value: str) -> str:
        return _check_topic_level(value)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Self:
        context = info.context if isinstance(info.context, dict) else {}
        if context.get("defer_cross_checks"):
            return self
        problems = cross_check(self)
        if problems:
            raise ValueError("; ".join(f"{format_loc(loc)}: {reason}" for loc, reason in problems))
        return self

    def find_user(self, name: str) -> UserConfig | None:
        """The configured user called `name`, if any."""
        for user in self.users:
            if user.name == name:
                return user
        return None

    def summary(self) -> dict[str, Any]:
        """What the node runs with, without secrets (logged at start-up)."""
        return {
            "data_dir": str(self.data_dir),
            "tenant": self.tenant,
            "dialplan": str(self.dialplan),
            "sip_listen": self.sip.listen,
            "sip_domain": self.sip.domain,
            "http_listen": self.http.listen,
            "mqtt": _redact_url(self.mqtt.url),
            "store": _redact_url(self.store.url),
            "media_workers": self.media.workers,
            "max_calls": self.media.max_calls,
            "rtp_ports": self.media.rtp_ports,
            "users": len(self.users),
            "agents": len(self.agents),
            "queues": [q.id for q in self.queues],
            "api_accounts": len(self.api_accounts),
            "trunks": [t.name for t in self.trunks],
        }


Loc = tuple[str | int, ...]


def cross_check(config: Config) -> list[tuple[Loc, str]]:
    """Checks that span several entries: unique names, references that resolve, ports that do not clash."""
    problems: list[tuple[Loc, str]] = []

    def unique(section: str, key: str, values: list[str]) -> None:
        seen: dict[str, int] = {}
        for index, value in enumerate(values):
            if value in seen:
                problems.append(
                    ((section, index, key), f"duplicate {value!r} (also {section}[{seen[value]}])")
                )
            else:
                seen[value] = index

    unique("users", "name", [u.name for u in config.users])
    unique("agents", "id", [a.id for a in config.agents])
    unique("queues", "id", [q.id for q in config.queues])
    unique("api_accounts", "sid", [a.sid for a in config.api_accounts])
    unique("trunks", "name", [t.name for t in config.trunks])

    user_names = {u.name for u in config.users}
    queue_ids = {q.id for q in config.queues}
    agent_ids = {a.id for a in config.agents}
    for index, agent in enumerate(config.agents):
        if agent.extension is not None and agent.extension not in user_names:
            problems.append(
                (("agents", index, "extension"), f"no user named {agent.extension!r} in [[users]]")
            )
        for queue_index, queue in enumerate(agent.queues):
            if queue not in queue_ids:
                problems.append(
                    (("agents", index, "queues", queue_index), f"no queue {queue!r} in [[queues]]")
                )
        for member_index, member in enumerate(agent.team):
            if member not in agent_ids:
                problems.append(
                    (("agents", index, "team", member_index), f"no agent {member!r} in [[agents]]")
                )

    # Sockets that would collide: the edge's TCP listener, the HTTP server and the embedded broker all
    # listen on TCP (port 0 always picks a fresh port, so it never clashes).
    tcp_listeners: list[tuple[Loc, str, int]] = [
        (("sip", "listen"), config.sip.listen_host, config.sip.listen_port),
        (("http", "listen"), config.http.listen_host, config.http.listen_port),
    ]
    if config.mqtt.embedded:
        tcp_listeners.append((("mqtt", "url"), config.mqtt.host, config.mqtt.port))
    for i, (loc, host, port) in enumerate(tcp_listeners):
        for other_loc, other_host, other_port in tcp_listeners[:i]:
            if port != 0 and port == other_port and _hosts_overlap(host, other_host):
                problems.append((loc, f"port {port} is also used by {format_loc(other_loc)}"))
    return problems


def _hosts_overlap(a: str, b: str) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return a == b or a in wildcard or b in wildcard


def format_loc(loc: Loc) -> str:
    """A validation location as a key path: `users[0].password` (the form every config error uses)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _redact_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# -- loading ----------------------------------------------------------------------------------------


def load_config(
    path: Path | str | None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Read `path` (the demo configuration when None), apply environment overrides, validate.

    Relative paths resolve against `cwd` (default: the current directory). Raises `ConfigError`.
    """
    if path is None:
        return parse_config(DEMO_CONFIG_TOML, DEMO_SOURCE, env=env, cwd=cwd)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{path}: cannot read: {reason}"]) from None
    return parse_config(text, str(path), env=env, cwd=cwd)


def parse_config(
    text: str,
    source: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Config:
    """Parse TOML text named `source` (used in error messages) into a validated `Config`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(source, text, exc)]) from None

    overrides = apply_env_overrides(data, os.environ if env is None else env)
    context = {"cwd": cwd if cwd is not None else Path.cwd(), "defer_cross_checks": True}
    locator = _KeyLocator(text)
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors():
            key_path = _data_path(data, error["loc"])
            reason = str(error["msg"]).removeprefix("Value error, ")
            problem = _located(source, locator, overrides, key_path, reason)
            if problem not in problems:
                problems.append(problem)
        raise ConfigError(problems) from None

    located = [_located(source, locator, overrides, loc, reason) for loc, reason in cross_check(config)]
    if located:
        raise ConfigError(located)
    return config


def env_override_key(name: str) -> Loc | None:
    """The key an environment variable overrides (`SOFTSWITCH_SIP_LISTEN` -> ("sip", "listen")), or None."""
    if not name.startswith(ENV_PREFIX):
        return None
    rest = name.removeprefix(ENV_PREFIX).lower()
    if rest in ENV_TOP_LEVEL:
        return (rest,)
    section, _, key = rest.partition("_")
    if section not in ENV_SECTIONS or not key:
        return None
    return (section, key)


def apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[Loc, str]:
    """Apply `SOFTSWITCH_<SECTION>_<KEY>` / `SOFTSWITCH_<TOPKEY>` to `data` in place.

    Values are read as TOML scalars when they parse as one (`5`, `true`, `"x"`), otherwise taken as plain
    strings; a key whose field is a string always takes the raw text (so `SOFTSWITCH_TENANT=1001` works).
    Returns which key each variable set, for error messages.
    """
    applied: dict[Loc, str] = {}
    for name in sorted(env):
        loc = env_override_key(name)
        if loc is None:
            continue
        value = _env_value(loc, env[name])
        target = data
        for part in loc[:-1]:
            existing = target.get(str(part))
            if not isinstance(existing, dict):
                existing = {}
                target[str(part)] = existing
            target = existing
        target[str(loc[-1])] = value
        applied[loc] = name
    return applied


def _env_value(loc: Loc, raw: str) -> Any:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    else:
        field = model.model_fields.get(str(loc[-1]))
        if field is not None and field.annotation in (str, Path):
            return raw
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def _syntax_problem(source: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        line, where = int(match.group(1)), f" (column {match.group(2)})"
        message = message[: match.start()]
    else:
        line, where = max(1, text.count("\n") + (0 if text.endswith("\n") else 1)), ""
        message = re.sub(r"\s*\(at end of document\)$", "", message) + " at end of file"
    return f"{source}:{line}: TOML syntax error: {message}{where}"


def _data_path(data: Any, loc: Sequence[str | int]) -> Loc:
    """The part of a pydantic error location that names keys of the file.

    Pydantic appends union-member tags (`int`, `literal['auto']`) after a value: they are dropped. A key
    that is missing from the data (a required field) is kept as the last element.
    """
    path: list[str | int] = []
    current = data
    for part in loc:
        if isinstance(current, dict):
            path.append(part)
            if part not in current:
                break
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
        else:
            break
    return tuple(path)


def _located(source: str, locator: _KeyLocator, overrides: dict[Loc, str], loc: Loc, reason: str) -> str:
    for key, variable in overrides.items():
        if loc[: len(key)] == key:
            return f"environment {variable}: {format_loc(loc)}: {reason}"
    return f"{source}:{locator.line_of(loc)}: {format_loc(loc)}: {reason}"


class _KeyLocator:
    """Finds the line of a key path in TOML text without a position-aware parser.

    Tracks `[table]` and `[[array]]` headers (counting the array's entries) and `key =` lines, skipping
    multi-line strings. A path that is not found falls back to its nearest enclosing table, then line 1.
    """

    _ARRAY_HEADER = re.compile(r"^\s*\[\[\s*([^\[\]]+?)\s*\]\]")
    _TABLE_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]")
    _KEY = re.compile(
        r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
    )

    def __init__(self, text: str) -> None:
        self._lines: dict[Loc, int] = {}
        array_counts: dict[Loc, int] = {}
        table: Loc = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            if match := self._ARRAY_HEADER.match(line):
                name = self._split_key(match.group(1))
                index = array_counts.get(name, 0)
                array_counts[name] = index + 1
                table = (*name, index)
                self._lines.setdefault(name, number)
                self._lines[table] = number
            elif match := self._TABLE_HEADER.match(line):
                table = self._split_key(match.group(1))
                self._lines.setdefault(table, number)
            elif match := self._KEY.match(line):
                self._lines.setdefault((*table, *self._split_key(match.group(1))), number)
                for quote in ('"""', "'''"):
                    if line.count(quote) % 2 == 1:
                        in_multiline = quote
                        break

    @staticmethod
    def _split_key(text: str) -> Loc:
        parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
        return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)

    def line_of(self, loc: Loc) -> int:
        path = tuple(loc)
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return 1
