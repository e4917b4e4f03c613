"""The `dsv4` command: devices, run, plan, conformance, bench.

Each subcommand's body lives next to what it drives (commands.py, conformance/command.py, bench.py); this file
only builds the parser and turns library errors into one clear line and a non-zero exit.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _subcommands():
    """(name, help, add_args, main) for every subcommand; imported lazily so `dsv4 --help` stays fast."""
    from . import commands
    subs = [
        ("devices", "list backends, whether each is usable here and why, and the provider chosen per op",
         commands.add_devices_args, commands.devices_main),
        ("run", "load a checkpoint (default: the built-in tiny model) and generate tokens",
         commands.add_run_args, commands.run_main),
        ("plan", "weight and KV-cache bytes for a config and context length, before loading anything",
         commands.add_plan_args, commands.plan_main),
    ]
    try:
        from .conformance.command import add_conformance_args, conformance_main
        subs.append(("conformance", "check every op's providers against the pure-PyTorch reference",
                     add_conformance_args, conformance_main))
    except ImportError as e:   # only while the harness is being built; says so instead of vanishing
        print(f"warning: conformance command unavailable: {e}", file=sys.stderr)
    try:
        from .bench import add_bench_args, bench_main
        subs.append(("bench", "time every op's providers side by side at V4-Flash / V4-Pro shapes",
                     add_bench_args, bench_main))
    except ImportError as e:
        print(f"warning: bench command unavailable: {e}", file=sys.stderr)
    return subs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 on NVIDIA GPUs and Ascend NPUs")
    parser.add_argument("--version", action="version", version=f"dsv4_portable {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_args, main in _subcommands():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(main=main)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .registry import BackendUnavailableError, NoProviderError, OpInputError, UnknownDeviceError
    args = build_parser().parse_args(argv)
    try:
        return int(args.main(args) or 0)
    except (ConfigError, UnknownDeviceError, BackendUnavailableError, NoProviderError, OpInputError,
            FileNotFoundError, ValueError) as e:
        # Library errors already name the problem; a traceback would only hide it (DSV4_DEBUG=1 shows it).
        if os.environ.get("DSV4_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
