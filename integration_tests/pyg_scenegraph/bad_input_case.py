"""The case type of the pyg_scenegraph bad-input table (docs/reliability.md, issue #16).

One :class:`BadInputCase` is one public call with a bad or edge-case input and what must happen: either a
clear error (``raises`` + a regex ``match`` on the message) or a handled result (``check`` asserts on the
returned value). ``test_bad_input.py`` runs every case of its own table and, when the module exists, of
``bad_input_evaluator_cases.EVALUATOR_CASES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["BadInputCase", "run_case"]


@dataclass(frozen=True)
class BadInputCase:
    """One bad input and its expected outcome.

    Attributes:
        id: pytest id of the case, ``"<entry>-<problem>"`` (e.g. ``"EGNNConv-float64-x"``).
        call: Builds the inputs and makes the call; returns what ``check`` inspects.
        raises: Expected exception type; ``None`` for a handled case.
        match: Regex that the exception message must contain (``pytest.raises(match=...)``); required with
            ``raises``.
        check: For a handled case, asserts on ``call()``'s result (and may inspect state it captured).
        covers: The problem class of docs/reliability.md, e.g. ``"nan"``, ``"dtype"``, ``"state"``.
    """

    id: str
    call: Callable[[], Any]
    raises: type[BaseException] | None = None
    match: str | None = None
    check: Callable[[Any], None] | None = None
    covers: str = ""

    def __post_init__(self) -> None:
        if (self.raises is None) == (self.check is None):
            raise ValueError(f"case {self.id!r}: give exactly one of 'raises' and 'check'")
        if self.raises is not None and not self.match:
            raise ValueError(f"case {self.id!r}: an expected error needs a message fragment 'match'")

    @property
    def outcome(self) -> str:
        """``"clear error"`` or ``"handled"``, for the per-outcome counts of the report."""
        return "clear error" if self.raises is not None else "handled"

    def param(self) -> Any:
        """The case as a ``pytest.param`` with its id."""
        return pytest.param(self, id=self.id)


def run_case(case: BadInputCase) -> None:
    """Run one case: the expected exception with its message, or the handled result's check."""
    if case.raises is not None:
        with pytest.raises(case.raises, match=case.match):
            case.call()
        return
    assert case.check is not None
    case.check(case.call())
