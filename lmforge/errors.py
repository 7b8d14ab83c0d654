"""User-facing errors: caught by the CLI and printed as one line, never a traceback."""
from __future__ import annotations

import difflib


class LmforgeError(Exception):
    """An error caused by the user's input (files, options, data). The message is the whole story."""


def closest(word: str, choices) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
