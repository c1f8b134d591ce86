"""The ``consa`` command line. Each subcommand lives in ``consa/commands/<name>.py`` and exposes
``register(subparsers)``; bad input of any kind ends as one ``consa: error: …`` line and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ConsaError
from .interrupts import ctrl_c_raises, quiet_ctrl_c

COMMANDS = ("demo", "search", "rules", "plot", "data", "eval", "report", "export", "pretrain", "experiment", "heal", "compare",
            "serve")


class _Parser(argparse.ArgumentParser):
    """argparse, but a parse error is the same single ``consa: error:`` line as any other bad input."""

    def error(self, message: str):
        print(f"consa: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="consa", description="Learn where a decoder LLM needs full attention (ConSA).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"consa.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"consa.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        ctrl_c_raises()  # until now (imports) a Ctrl-C ended the command at once; now it may need cleaning up
        return _run(argv)
    except KeyboardInterrupt:
        print("consa: interrupted", file=sys.stderr)
        return 130
    finally:
        quiet_ctrl_c()  # the interpreter's exit (library clean-up) can take a moment too


def _run(argv: list[str] | None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # library chatter would break the one-line error contract
    hf_logging.disable_progress_bar()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a parse error already printed as one line
        return e.code if isinstance(e.code, int) else int(e.code is not None) * 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except ConsaError as e:
        print(f"consa: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user named: missing, unwritable, a file where a folder should be
        where = f"{e.filename}: " if e.filename else ""
        what = (e.strerror or str(e) or type(e).__name__).strip().splitlines()[0]
        print(f"consa: error: {where}{what}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from .train.distributed import exit_process

    exit_process(main())
