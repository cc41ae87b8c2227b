"""Start a real `softswitch serve` for a test: free ports, private data_dir, clean stop.

    with running_softswitch(tmp_path, extra_toml='[sip]\\nmin_expires = 1\\n') as node:
        ... node.sip_port, node.http_port, node.mqtt_port, node.data_dir, node.log_path ...

The configuration is the demo one (users 1001-1004 / demo1001-demo1004, agents 8001-8002 in queue
`support`, the demo API account) with every port 0, `data_dir` under `tmp_path` and one media worker.
`extra_toml` is merged into it: a table (`[sip]`) adds or replaces keys; an array of tables
(`[[users]]`) replaces the demo entries, and when users are replaced the demo agents whose extension is
gone are dropped too. On leaving the block the node gets SIGTERM and must exit 0 within the stop timeout
(SIGKILL otherwise, and the test fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softswitch.config import DEMO_CONFIG_TOML, env_override_key

REPO_ROOT = Path(__file__).resolve().parents[2]
SOFTSWITCH_EXE = REPO_ROOT / ".venv" / "bin" / "softswitch"

#: Seconds to wait for ports.json after launch (media workers probe their capacity at start-up).
START_TIMEOUT_S = 60.0
#: Seconds a node gets to exit after SIGTERM/SIGINT (CONTRACT: a clean stop is prompt).
STOP_TIMEOUT_S = 10.0
#: Lines of the node's log quoted in failure messages.
LOG_TAIL_LINES = 60


@dataclass
class RunningSoftswitch:
    """A node started by `running_softswitch` / `launch_softswitch`."""

    process: subprocess.Popen[bytes]
    config_path: Path | None
    data_dir: Path
    log_path: Path
    sip_port: int
    http_port: int
    mqtt_port: int | None
    killed: bool = False  # by kill(): the test crashed it on purpose

    @property
    def pid(self) -> int:
        return self.process.pid

    def http_url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_records(self) -> list[dict[str, Any]]:
        """The node's JSON log lines, parsed (lines that are not JSON objects are skipped)."""
        records = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def kill(self) -> None:
        """Crash the node: SIGKILL, as a power cut would (its media workers go too, as the OOM killer or
        a reboot would take them); leaving the block then expects no clean exit."""
        self.killed = True
        self.stop(signal.SIGKILL)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send `sig` to the node and wait for it; SIGKILL (and AssertionError) if it overstays."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(self.process)
            raise AssertionError(
                f"softswitch (pid {self.process.pid}) did not exit within {timeout_s} s of {sig.name}; "
                f"killed.\n--- log tail ---\n{self.log_tail()}"
            ) from None
        finally:
            # Anything the node left behind in its session (e.g. media workers) goes too.
            _kill_group(self.process, only_members=True)


def node_config(tmp_path: Path, extra_toml: str = "") -> dict[str, Any]:
    """The configuration `running_softswitch` writes (demo config, ports 0, data under tmp_path)."""
    config = tomllib.loads(DEMO_CONFIG_TOML)
    config["data_dir"] = str(tmp_path / "data")
    config["dialplan"] = str(REPO_ROOT / "dialplans" / "default.yaml")
    config["sip"]["listen"] = "127.0.0.1:0"
    config["http"]["listen"] = "127.0.0.1:0"
    config["mqtt"]["url"] = "embedded://127.0.0.1:0"
    config["media"]["workers"] = 1
    config["log"] = {"level": "info", "format": "json"}
    config.pop("store", None)  # derived from data_dir
    if extra_toml:
        extra = tomllib.loads(extra_toml)
        _merge(config, extra)
        if "users" in extra and "agents" not in extra:
            names = {user.get("name") for user in config["users"]}
            config["agents"] = [a for a in config.get("agents", []) if a.get("extension") in names]
    return config


@contextlib.contextmanager
def running_softswitch(
    tmp_path: Path,
    extra_toml: str = "",
    *,
    start_timeout_s: float = START_TIMEOUT_S,
    stop_timeout_s: float = STOP_TIMEOUT_S,
) -> Iterator[RunningSoftswitch]:
    """Run `softswitch serve --config <test config>` for the duration of the block."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "softswitch.toml"
    config = node_config(tmp_path, extra_toml)
    config_path.write_text(to_toml(config), encoding="utf-8")
    with launch_softswitch(
        ["serve", "--config", str(config_path)],
        data_dir=Path(config["data_dir"]),
        log_path=tmp_path / "softswitch.log",
        config_path=config_path,
        start_timeout_s=start_timeout_s,
        stop_timeout_s=stop_timeout_s,
    ) as node:
        yield node


@contextlib.contextmanager
def launch_softswitch(
    args: Sequence[str],
    *,
    data_dir: Path,
    log_path: Path,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO_ROOT,
    start_timeout_s: float = START_TIMEOUT_S,
    stop_timeout_s: float = STOP_TIMEOUT_S,
) -> Iterator[RunningSoftswitch]:
    """Start `softswitch ARGS` in its own session, wait for `{data_dir}/ports.json`, stop it on exit.

    `env` adds variables to a copy of this process's environment from which every configuration override
    (`SOFTSWITCH_<SECTION>_<KEY>`) has been removed.
    """
    if not SOFTSWITCH_EXE.exists():
        raise AssertionError(f"{SOFTSWITCH_EXE} is missing: run `make test`, which installs the package")
    child_env = {k: v for k, v in os.environ.items() if env_override_key(k) is None}
    child_env.update(env or {})
    ports_file = data_dir / "ports.json"
    ports_file.unlink(missing_ok=True)  # left by a node that crashed: wait for this one's
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(SOFTSWITCH_EXE), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=child_env,
            start_new_session=True,
        )
    try:
        ports = _wait_for_ports(process, ports_file, log_path, start_timeout_s)
    except BaseException:
        _kill_group(process)
        process.wait(timeout=stop_timeout_s)
        raise
    node = RunningSoftswitch(
        process=process,
        config_path=config_path,
        data_dir=data_dir,
        log_path=log_path,
        sip_port=int(ports["sip"]),
        http_port=int(ports["http"]),
        mqtt_port=None if ports.get("mqtt") is None else int(ports["mqtt"]),
    )
    try:
        yield node
    except BaseException:
        with contextlib.suppress(AssertionError):
            node.stop(timeout_s=stop_timeout_s)
        raise
    returncode = node.stop(timeout_s=stop_timeout_s)
    if not node.killed:
        assert returncode == 0, f"softswitch exited with {returncode}\n--- log tail ---\n{node.log_tail()}"


def _wait_for_ports(
    process: subprocess.Popen[bytes], ports_file: Path, log_path: Path, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ports_file.exists():
            try:
                ports: dict[str, Any] = json.loads(ports_file.read_text(encoding="utf-8"))
                return ports
            except ValueError:
                pass  # written atomically, so this is a stale or foreign file: keep waiting
        if process.poll() is not None:
            raise AssertionError(
                f"softswitch exited with {process.returncode} before writing {ports_file}\n"
                f"--- log tail ---\n{_tail(log_path)}"
            )
        time.sleep(0.05)
    raise AssertionError(f"no {ports_file} within {timeout_s} s\n--- log tail ---\n{_tail(log_path)}")


def _tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _kill_group(process: subprocess.Popen[bytes], *, only_members: bool = False) -> None:
    """SIGKILL the session the node leads (its pgid is its pid); `only_members` once the leader is gone."""
    if only_members and process.poll() is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def to_toml(data: Mapping[str, Any]) -> str:
    """Serialize the TOML subset a configuration uses: scalars, arrays, tables, arrays of tables."""
    lines: list[str] = []
    _emit_table(lines, (), data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    for key, value in table.items():
        if not _is_table(value) and not _is_table_array(value):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            lines.extend(["", f"[{'.'.join(_key(k) for k in (*path, key))}]"])
            _emit_table(lines, (*path, key), value)
        elif _is_table_array(value):
            for entry in value:
                lines.extend(["", f"[[{'.'.join(_key(k) for k in (*path, key))}]]"])
                _emit_table(lines, (*path, key), entry)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
