"""Command-line parsing shared by every ``dmoe`` subcommand.

Each flag can also be set by an environment variable (``DMOE_<FLAG>``, e.g. ``DMOE_MAX_BATCH_SIZE``)
or in a config file given with ``--config`` (``key = value`` lines, keys as the long flag names).
Precedence: command line > environment > config file > default.
"""

from __future__ import annotations

import argparse
import logging
import os

import configargparse

from dmoe.errors import ConfigError


def make_parser(prog: str, description: str, epilog: str | None = None) -> configargparse.ArgumentParser:
    parser = configargparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        auto_env_var_prefix="DMOE_",
        add_config_file_help=False,
        add_env_var_help=False,
    )
    parser.add_argument("--config", is_config_file=True, help="config file of `flag = value` lines")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity"
    )
    return parser


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def setup_logging(level: str = "INFO") -> None:
    """One log format for every dmoe process; quiets chatty libraries."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def fail(message: str) -> ConfigError:
    """Build the error a CLI prints as one line before exiting 2."""
    return ConfigError(message)


