"""The README's Python example runs as written and learns the toy data."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_trains_and_samples_bars(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    for images in (scope["x"], scope["x_ddpm"]):
        assert images.shape == (16, 1, 8, 8)
        columns = images.mean(dim=2)[:, 0]  # [16, 8]: one bright column per image
        bar_like = (columns.max(1).values > 0.5) & (columns.median(1).values < -0.5)
        assert bar_like.sum().item() >= 12, columns
