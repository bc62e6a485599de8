"""What every offline tool does with bad input: one ``error: ...`` line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``, with a ValueError/OSError (ShardError included) reported as one line."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
