"""How the config tree becomes command-line flags, environment variables and config-file keys.

Every option of a dmoe process is a field of a small dataclass in ``dmoe.config`` (one per
concern: ``BatchingOptions``, ``MoEOptions``, ...), declared with ``option()`` and documented by
the string literal right under it, as in::

    @dataclass
    class CheckpointOptions:
        checkpoint_interval: float = option(120.0, parse=positive_float)
        \"\"\"seconds between checkpoints\"\"\"

``add_options(parser, CheckpointOptions)`` turns each field into ``--checkpoint-interval`` (type
from ``parse``, help from the docstring, default from the field, shown by ``--help``), which
configargparse also reads from ``DMOE_CHECKPOINT_INTERVAL`` and from ``--config`` files
(``checkpoint-interval = 60``). Precedence: command line > environment > config file > default.
``options_from(CheckpointOptions, args)`` builds the dataclass back from the parsed flags, so the
default lives in the field and nowhere else.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import logging
import os
import textwrap
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import configargparse

from dmoe.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = dataclasses.MISSING


# ---- value parsers (argparse `type=`): one-line errors naming what was expected ----


def _number(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def port_number(text: str) -> int:
    value = _number(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


# ---- declaring options ----


def option(
    default: Any = _MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
    choices: Iterable[str] | None = None,
    nargs: str | None = None,
    metavar: str | None = None,
    group: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field: its default (or ``factory``) plus what its flag needs.

    ``flag`` overrides the flag name (default: ``--field-name``); ``group`` names the ``--help``
    section (default: the dataclass's); ``cli=False`` keeps a field off the command line (library
    and scenario settings). A ``bool`` field becomes a switch that flips its default
    (``--no-progress`` for ``progress = True``, give ``flag``).
    """
    meta = {"parse": parse, "flag": flag, "choices": tuple(choices) if choices else None, "nargs": nargs,
            "metavar": metavar, "group": group, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written right under it in ``cls``'s source (whitespace folded)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen app): flags simply have no help text
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (so other places can refer to it, not copy it)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    title: str | None = None,
    skip: Iterable[str] = (),
    parse: dict[str, Callable[[str], Any]] | None = None,
    groups: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add a flag per command-line field of ``cls``; returns the argument groups by name.

    ``parse`` supplies value parsers that belong to a plane (multiaddrs need hivemind, uid
    patterns need the DHT grammar); ``groups`` lets several dataclasses share ``--help`` sections.
    """
    groups = {} if groups is None else groups
    docs = field_docs(cls)
    skipped = set(skip)
    default_title = title or (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
    for f in _cli_fields(cls):
        if f.name in skipped:
            continue
        meta = f.metadata
        name = meta["group"] or default_title
        group = groups.get(name)
        if group is None:
            group = groups[name] = parser.add_argument_group(name)
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "help": docs.get(f.name, "")}
        required = f.default is _MISSING and f.default_factory is _MISSING
        default = None if required else default_of(cls, f.name)
        if f.type in (bool, "bool"):
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs["type"] = (parse or {}).get(f.name) or meta["parse"]
            for key in ("choices", "nargs", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        group.add_argument(flag, **kwargs)
    return groups


def options_from(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """``cls`` built from the parsed flags of its command-line fields; ``overrides`` set the others."""
    values = {f.name: getattr(args, f.name) for f in _cli_fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


# ---- parsers and logging shared by every subcommand ----


def make_parser(prog: str, description: str, epilog: str | None = None) -> configargparse.ArgumentParser:
    """A parser whose flags also come from ``DMOE_<FLAG>`` and ``--config``; a bad flag is one line."""
    parser = configargparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=_HelpFormatter,
        auto_env_var_prefix="DMOE_",
        add_config_file_help=False,
        add_env_var_help=False,
    )
    parser.add_argument("--config", is_config_file=True, help="config file of `flag = value` lines")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity"
    )

    def one_line_error(message: str) -> None:
        parser.exit(2, f"{prog}: {message} (see {prog} --help)\n")

    parser.error = one_line_error  # type: ignore[method-assign]
    return parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps epilog examples as written and shows every default that says something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if action.required or default is None or isinstance(default, bool) or default == []:
            return action.help
        return super()._get_help_string(action)


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
