"""The ``largevocab`` command line: ``largevocab demo`` (or ``python -m largevocab demo``)."""

from __future__ import annotations

import sys

COMMANDS = {"demo": "largevocab.demo"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: largevocab {" + ",".join(COMMANDS) + "} [options]\n"
              "  demo   full cross-entropy against largevocab's fused loss: same numbers, a fraction of the memory")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
