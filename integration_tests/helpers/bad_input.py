"""Expected outcomes of the table-driven bad-input tests (docs/reliability.md, issue #16).

A case either raises (:class:`Raises`: the exception type and a regex its message must contain) or is handled
(:class:`Handled`: a predicate on the call's result, and what it checks, for the failure message).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["Handled", "Raises", "check_outcome"]


@dataclass(frozen=True)
class Raises:
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class Handled:
    check: Callable[[Any], bool]
    what: str


def check_outcome(call: Callable[[], Any], expected: Raises | Handled) -> None:
    """Run ``call`` and assert the expected outcome: the error with its message, or the handled check."""
    if isinstance(expected, Raises):
        with pytest.raises(expected.error, match=expected.match):
            call()
    else:
        assert expected.check(call()), f"expected {expected.what}"
