"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    assert BLOCKS


SERVICE_URL = "http://127.0.0.1:7860"  # blocks that talk to latentdiff serve run against one started here


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index]
    if SERVICE_URL not in code:
        exec(compile(code, f"README.md python block {index}", "exec"), {})
        return
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from helpers import Server

    server = Server(tmp_path / "serve-data").start()
    try:
        exec(compile(code.replace(SERVICE_URL, server.url), f"README.md python block {index}", "exec"), {})
    finally:
        server.stop()
