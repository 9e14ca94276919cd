"""The ``largevocab`` command line. With no arguments it runs the main job (``largevocab lm``)."""

from __future__ import annotations

import importlib
import sys

# Subcommands live in modules imported on demand, so the core never imports transformers or recommender code.
COMMANDS = {
    "lm": ("largevocab.integrations.lm_benchmark", "train a small LM with full CE and each largevocab loss"),
    "sasrec": ("largevocab.integrations.sasrec.cli", "train and evaluate SASRec with any loss"),
    "demo": ("largevocab.demo", "full CE vs the fused loss on one LM-head-sized batch"),
}
DEFAULT_COMMAND = "lm"


def usage() -> str:
    lines = ["usage: largevocab [COMMAND] [options]   (no COMMAND: the main job, `largevocab lm`)", ""]
    lines += [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0].startswith("-"):
        argv = [DEFAULT_COMMAND, *argv]
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
