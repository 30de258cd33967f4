"""Execute every ```python snippet of README.md, so the documented usage cannot rot.

Each snippet runs in a fresh namespace, in the order it appears, in a temporary working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^## (.+)$", re.MULTILINE)


def _snippets() -> list[tuple[str, str]]:
    text = README.read_text()
    headings = [(m.start(), m.group(1).strip()) for m in _HEADING.finditer(text)]
    found = []
    for match in _FENCE.finditer(text):
        section = next((title for start, title in reversed(headings) if start < match.start()), "top")
        found.append((f"{section} #{sum(1 for s, _ in found if s.startswith(section)) + 1}", match.group(1)))
    return found


SNIPPETS = _snippets()


def test_readme_has_snippets() -> None:
    assert SNIPPETS, "README.md should document each plugin with an executable ```python snippet"


@pytest.mark.parametrize("code", [code for _, code in SNIPPETS], ids=[name for name, _ in SNIPPETS])
def test_readme_snippet_runs(code: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
