"""The declared Python floor covers what the code imports."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_requires_python_covers_tomllib():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    floor = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip()).groups())
    uses_tomllib = [p for p in (ROOT / "steplab").rglob("*.py") if re.search(r"^\s*import tomllib", p.read_text(), re.M)]
    assert uses_tomllib, "tomllib is no longer imported: this test can go"
    assert floor >= (3, 11), f"requires-python {spec!r}, but {uses_tomllib[0].relative_to(ROOT)} imports tomllib (3.11+)"


def test_dev_dependencies_are_declared():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(d.startswith("hypothesis") for d in dev)  # tests/test_config_validation.py
