"""The rich console the ``hal`` commands print through.

On a terminal rich fits tables to its width. Piped into a file or a CI log there is no width to
fit, and rich's default of 80 columns folds every wide cell (a bench table's case ids came out four
characters per line); there the width is ``COLUMNS`` when set, else :data:`LOG_WIDTH`.
"""

from __future__ import annotations

import os

from rich.console import Console

__all__ = ["LOG_WIDTH", "console"]

LOG_WIDTH = 200  # wide enough for the bench's nine columns without folding a DeepSeek-V3 case id


def console(*, stderr: bool = False, soft_wrap: bool = False) -> Console:
    """A Console on stdout (or stderr): the terminal's width on a terminal, else ``COLUMNS`` or LOG_WIDTH."""
    made = Console(stderr=stderr, soft_wrap=soft_wrap)
    if made.is_terminal or os.environ.get("COLUMNS"):
        return made
    return Console(stderr=stderr, soft_wrap=soft_wrap, width=LOG_WIDTH)
