"""colab.ipynb: the papermill contract CI relies on and the README's badge. (CI executes the
notebook itself in smoke mode: `papermill colab.ipynb OUT -p SMOKE True`.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def code_cells() -> list[dict[str, Any]]:
    notebook = json.loads((REPO / "colab.ipynb").read_text(encoding="utf-8"))
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def source(cell: dict[str, Any]) -> str:
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def test_first_code_cell_is_the_parameters_cell_with_smoke_off() -> None:
    first = code_cells()[0]
    assert first["metadata"].get("tags") == ["parameters"]
    assert source(first).splitlines()[0].startswith("SMOKE = False")
    assert not any("SMOKE =" in source(cell) for cell in code_cells()[1:])


def test_notebook_is_saved_without_outputs() -> None:
    """What users open is what CI runs: no stale outputs from someone's session."""
    for cell in code_cells():
        assert cell["outputs"] == [] and cell["execution_count"] is None, source(cell)[:60]


def test_readme_badge_and_clone_url_name_the_same_repository() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    badge = re.search(r"\(https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/"
                      r"main/colab\.ipynb\)", readme)
    assert badge, "README needs the Open in Colab badge linking to colab.ipynb"
    clone = re.search(r'REPO_URL = "https://github\.com/([\w.-]+/[\w.-]+)"',
                      source(code_cells()[0]))
    assert clone, "the parameters cell sets REPO_URL"
    assert clone.group(1) == badge.group(1)
