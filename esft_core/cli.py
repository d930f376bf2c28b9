"""The `esft` command. Each command group lives in esft_core/commands/<group>.py and exposes `register(sub)`.

One error style for every command group: errors (EsftError, missing files, and argparse usage errors such as a
missing flag or a bad choice) become one line `esft <cmd>: error: ...` on stderr with exit code 2; no traceback,
no usage block.
"""

from __future__ import annotations

import argparse
import sys

from esft_core import settings
from esft_core.commands import demo, trace, training
from esft_core.errors import EsftError, bounded, damaged_db_message

# Command groups, in help order. A module registers its subcommands with `register(subparsers)` and sets
# `func` on each parser via `set_defaults(func=...)`; `func(args) -> int | None` is the exit code.
COMMAND_GROUPS = (demo, trace, training)


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one stderr line `<prog>: error: <message>` (exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="esft",
        description="Expert-Specialized Fine-Tuning toolkit: record routing traces into DuckDB, score and select "
        "experts, train only the selected experts, evaluate and explore.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the users' registering modules (ESFT_METHOD_MODULES) for the choices
    except EsftError as e:
        print(bounded(f"esft: error: {e}"), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = args.func(args)
    except EsftError as e:
        print(f"esft {args.command}: error: {bounded(str(e))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"esft {args.command}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"esft {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # last resort: still one line, unless debugging
        if settings.get("ESFT_DEBUG"):
            raise
        damaged = damaged_db_message(e, getattr(args, "db", None))
        if damaged:
            print(f"esft {args.command}: error: {damaged}", file=sys.stderr)
            return 2
        print(bounded(f"esft {args.command}: error: {type(e).__name__}: {e}".splitlines()[0]), file=sys.stderr)
        return 1
    return int(code or 0)



def cli_options(command: str) -> set[str]:
    """The option strings (e.g. '--steps') the installed `esft <command>` accepts; empty when it does not exist."""
    parser = build_parser()
    for action in parser._actions:  # argparse keeps subparsers in a private list; there is no public accessor
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and command in choices:
            return {s for a in choices[command]._actions for s in a.option_strings}
    return set()


if __name__ == "__main__":
    sys.exit(main())
