"""The `softswitch` command (CONTRACT.md "CLI"): `serve`, `check-config`, `--version`.

Exit codes: 0 success; 1 `check-config` found problems, or the node could not start or failed;
2 usage or configuration errors for `serve`; 130 interrupted before the node ran. No traceback reaches the
user: failures are one clear message (and, at debug level, the traceback in the log).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from softswitch import __version__
from softswitch.config import DEMO_CONFIG_TOML, Config, ConfigError, load_config
from softswitch.dialplan.configured import load_configured_dialplan
from softswitch.dialplan.loader import DialplanError
from softswitch.logging import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEMO_BANNER = """\
No --config given: running the demo configuration below. Its passwords are the published demo ones
(see README.md): keep this node on loopback, and write your own file for anything else.
-------------------------------------------------------------------------------------------------------"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softswitch", description="A SIP-native softswitch and CTI engine.")
    parser.add_argument("--version", action="version", version=f"softswitch {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    serve = commands.add_parser("serve", help="run the softswitch")
    serve.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML configuration (default: the demo one)"
    )
    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", type=Path, metavar="FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `softswitch` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.file)
        return serve(args.config)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def check_config(path: Path) -> int:
    """Validate `path` exactly as `serve` would read it (environment overrides included), and the
    dialplan it names."""
    try:
        config = load_config(path)
        check_dialplan(config)
    except (ConfigError, DialplanError) as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_FAILURE
    print(f"{path}: ok")
    return EXIT_OK


def check_dialplan(config: Config) -> None:
    """Load the configured dialplan with the configuration's names; raises DialplanError."""
    load_configured_dialplan(config)


def serve(path: Path | None) -> int:
    """Load the configuration, set up logging and run the node until SIGINT/SIGTERM."""
    try:
        config = load_config(path)
        check_dialplan(config)
    except (ConfigError, DialplanError) as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("softswitch: configuration rejected, not starting", file=sys.stderr)
        return EXIT_USAGE
    if path is None:
        print(DEMO_BANNER, DEMO_CONFIG_TOML, sep="\n", flush=True)
    configure_logging(config.log.level, config.log.format)
    return _run(config)


def _run(config: Config) -> int:
    from softswitch import app  # imported here so `check-config` needs none of the runtime modules

    log = structlog.get_logger("softswitch")
    try:
        asyncio.run(app.run(config))
    except OSError as exc:
        log.error("cannot start", error=str(exc))
        return EXIT_FAILURE
    except Exception as exc:
        log.error(
            "softswitch failed",
            error=f"{type(exc).__name__}: {exc}",
            exc_info=config.log.level == "debug",
        )
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
