"""How a benchmark command hands over its report: printed, and written with its command."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line(subcommand: str) -> str:
    """`c2cserve bench <subcommand> <its arguments>` as typed (from sys.argv)."""
    argv = sys.argv
    rest = argv[argv.index(subcommand) + 1:] if subcommand in argv else []
    return " ".join(["c2cserve", "bench", subcommand, *(shlex.quote(a) for a in rest)])


def publish(report: str, out: str | Path) -> None:
    """Print the report and write it to `out` (folders made as needed)."""
    print(report, end="")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(f"wrote {path}")
