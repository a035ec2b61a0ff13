"""The Python examples of the README and of docs/ run as written; the training example learns the toy data."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets(page: Path) -> list:
    """The page's ```python blocks, each padded with blank lines so that tracebacks give the page's line numbers;
    the training example (it trains for minutes) is ``slow``."""
    text = page.read_text(encoding="utf-8")
    return [
        pytest.param(
            page,
            "\n" * text.count("\n", 0, m.start(1)) + m.group(1),
            id=f"{page.relative_to(ROOT)}#{i}",
            marks=[pytest.mark.slow] if "x_ddpm" in m.group(1) else [],
        )
        for i, m in enumerate(FENCE.finditer(text))
    ]


SNIPPETS = [snippet for page in PAGES for snippet in snippets(page)]


def run(page: Path, code: str) -> dict:
    scope: dict = {}
    exec(compile(code, str(page), "exec"), scope)
    return scope


def assert_bars(images) -> None:
    """Samples of the toy data: one bright vertical bar per image."""
    assert images.shape == (16, 1, 8, 8)
    columns = images.mean(dim=2)[:, 0]  # [16, 8]: one bright column per image
    bar_like = (columns.max(1).values > 0.5) & (columns.median(1).values < -0.5)
    assert bar_like.sum().item() >= 12, columns  # regression pin: observed 16 of 16 (DDIM and DDPM)


@pytest.mark.parametrize(("page", "code"), SNIPPETS)
def test_python_example_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = run(page, code)
    if "x_ddpm" in scope:  # the training example: DDIM and DDPM samples of the bars it trained on
        for images in (scope["x"], scope["x_ddpm"]):
            assert_bars(images)


def test_the_training_example_is_in_the_docs():
    assert sum("x_ddpm" in p.values[1] for p in SNIPPETS) == 1
