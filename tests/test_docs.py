"""docs/algorithms.md: its Python snippets run as written, its settings tables are the ones the
settings declarations generate, and nothing in the project points to a document it lacks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lightning_shampoo4.optim.settings import OPTIMIZERS

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "algorithms.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_algorithms_snippets_run_as_written(index):
    exec(compile(_blocks("python")[index], f"docs/algorithms.md#{index}", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_settings_tables_are_generated_from_the_declarations(name):
    marker = f"<!-- generated: {name}.SETTINGS.markdown() -->\n"
    text = DOC.read_text()
    assert marker in text, f"docs/algorithms.md has no table of {name}'s settings"
    assert text.split(marker, 1)[1].startswith(OPTIMIZERS[name].markdown() + "\n"), (
        "run: python -m lightning_shampoo4.optim.settings docs/algorithms.md"
    )


def _project_files() -> list[str]:
    """The tracked files (every file under the root outside a git checkout)."""
    run = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if run.returncode == 0 and run.stdout:
        return run.stdout.split()
    skip = (".git", ".venv", "build", "dist", "__pycache__")
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and not set(p.parts) & set(skip)]


def test_no_reference_to_a_missing_spec():
    files = _project_files()
    word = "SPEC" + ".md"  # spelled apart so this file does not match itself
    hits = [f for f in files if (REPO / f).is_file() and f.endswith((".py", ".md", ".yaml", ".toml", ".txt"))
            and word in (REPO / f).read_text(errors="ignore")]
    assert hits == []
