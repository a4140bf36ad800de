"""The error boundary of every entry script: UserError -> one line on stderr, exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a UserError (bad input) prints ``error: <message>`` and returns 2, no traceback.

    Ctrl-C returns 130 after the stage has saved what it can (each stage handles KeyboardInterrupt itself).
    """
    from ddpm_ood.errors import UserError

    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
