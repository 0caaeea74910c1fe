"""Pieces of one-line error messages: bounded lists of names and "did you mean" suggestions."""
from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["listing", "did_you_mean", "nearest_first"]


def listing(items: Iterable, limit: int = 5, *, quote: bool = False) -> str:
    """``"a, b, c"``, or the first ``limit`` items and ``"... (N in all)"`` when there are more; ``quote`` writes
    each item with repr (``'a'``)."""
    items = [repr(item) if quote else str(item) for item in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" ... ({len(items)} in all)"


def did_you_mean(word, choices: Iterable) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``word`` (difflib, similarity >= 0.6), to end a message
    with; ``""`` when no choice is close."""
    if not isinstance(word, str):
        return ""
    choices = [str(choice) for choice in choices]
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not matches:  # a case slip of a short word (``GPU``) can fall under the cutoff
        matches = [choice for choice in choices if choice.lower() == word.lower()][:1]
    return f"; did you mean {matches[0]!r}?" if matches else ""


def nearest_first(word, choices: Iterable) -> list:
    """``choices`` ordered by their similarity to ``word`` (the most similar first; ties in the given order)."""
    choices = list(choices)
    if not isinstance(word, str):
        return choices
    return sorted(choices, key=lambda choice: -difflib.SequenceMatcher(None, word, str(choice)).ratio())
