"""One CLI dialect for every launcher.

    python -m launchers.<name> [--config FILE.toml] [--set section.key=value ...] [--print-config] [aliases]

--config reads a TOML file of the config tree (core.config), --set overrides any key (repeatable),
--print-config prints the resolved config as TOML and exits. A few flags per launcher are aliases
of config keys (`--prompt X` is `generate.prompt=X`), applied between the file and --set. Local paths
in the config are resolved against the caller's directory before anything runs. Every input
problem ends as `<prog>: error: ...` with exit code 2, naming the file or key; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.config import Config, ConfigError, read_toml, resolve, resolve_path, toml_text
from core.configtree import merge

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


@dataclass(frozen=True)
class Alias:
    flag: str  # e.g. "--prompt"
    key: str  # e.g. "generate.prompt"
    help: str
    kind: Any = str  # str, int, float, "append" (repeatable, into a tuple), "false" (a flag setting False)


class UsageError(Exception):
    """An input problem found after parsing (a file, a value, a state on disk): exit 2 with its message."""


def parser_for(prog: str, description: str, aliases: Sequence[Alias] = (), *, stage: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.toml", help="a config file of the config tree (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    if stage:
        from core.stages import STAGE_NAMES

        parser.add_argument("--stage", choices=STAGE_NAMES, help="the stage to train (or stage = ... in the file)")
    for alias in aliases:
        if alias.kind == "append":
            parser.add_argument(alias.flag, action="append", default=None, help=f"{alias.help} [{alias.key}, repeatable]")
        elif alias.kind == "false":
            parser.add_argument(alias.flag, action="store_true", help=f"{alias.help} [{alias.key}=false]")
        else:
            parser.add_argument(alias.flag, type=alias.kind, default=None, help=f"{alias.help} [{alias.key}]")
    parser.set_defaults(_aliases=tuple(aliases))
    return parser


def alias_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for alias in args._aliases:
        given = getattr(args, alias.flag.lstrip("-").replace("-", "_"))
        if given is None or given is False:
            continue
        section, _, key = alias.key.partition(".")
        values.setdefault(section, {})[key] = False if alias.kind == "false" else given
    return values


def load(parser: argparse.ArgumentParser, args: argparse.Namespace, *, sections: Sequence[str],
         paths: Sequence[str] = ()) -> Config:
    """The resolved Config of parsed arguments; prints it and exits for --print-config.

    `sections`: what --print-config shows; `paths`: dotted keys holding local paths, made absolute
    against the current directory (a relative path must mean the same thing in a Ray worker).
    """
    try:
        values = read_toml(args.config) if args.config else {}
        values = merge(values, alias_values(args))
        cfg = resolve(values, stage=getattr(args, "stage", None), overrides=args.overrides)
        changes: dict[str, dict[str, Any]] = {}
        for dotted in paths:
            section, key = dotted.split(".")
            value = getattr(getattr(cfg, section), key)
            if isinstance(value, tuple):
                fixed: Any = tuple(resolve_path(v) for v in value)
            else:
                fixed = resolve_path(value)
            if fixed != value:
                changes.setdefault(section, {})[key] = fixed
        cfg = cfg.replace(**changes) if changes else cfg
    except ConfigError as error:
        parser.error(str(error))
    if args.print_config:
        print(toml_text(cfg.to_dict(), sections=sections), end="")
        parser.exit(0)
    return cfg


def setup_logging(level: int = logging.INFO) -> None:
    """Library code logs through `logging`; a launcher shows INFO lines on stdout, plainly."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("mmrec", "cluster", "datasets_prep", "core", "launchers"):
        logging.getLogger(name).setLevel(level)


def on_stop_signals(callback: Callable[[str], None]) -> None:
    """SIGINT/SIGTERM call `callback(name)` once (a graceful stop); a second signal stops at once."""

    def handler(number: int, _frame: Any) -> None:
        name = signal.Signals(number).name
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        callback(name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _raise_keyboard_interrupt(_number: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run(prog: str, main: Callable[[], int], *, usage_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a launcher body: input problems end as `prog: error: ...` (exit 2), Ctrl-C as one line (exit 130)."""
    from core.storage import StorageError

    # SIGTERM like Ctrl-C: cleanup code runs (Ray instances this process started, jobs, heads). A
    # launcher that stops gracefully installs its own handlers inside `main` (on_stop_signals).
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return main()
    except (ConfigError, UsageError, StorageError, *usage_errors) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def prog_name(module: str) -> str:
    """How the user called us: the console script's name (mmrec-train), or python -m launchers.train."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return script if script.startswith("mmrec-") else f"python -m {module}"
