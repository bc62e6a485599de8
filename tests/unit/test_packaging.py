"""pyproject.toml: an optional extra installs only packages some code of ours imports (an extra
must not promise what nothing uses), and the packages that cannot install on a CPU torch are in
none of them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
CODE = ["emu3_train", "kernels", "data_pipelines", "benchmarks", "launch"]
TOOLS = {"dev"}  # test and lint tools, run as commands rather than imported


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})


def _module(requirement: str) -> str:
    name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
    return name.lower().replace("-", "_")


def _imported() -> set[str]:
    pattern = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.M)
    found = set()
    for folder in CODE:
        for path in (REPO / folder).rglob("*.py"):
            found.update(m.lower() for m in pattern.findall(path.read_text()))
    return found


def test_every_extra_package_is_imported_by_our_code():
    imported = _imported()
    unused = {extra: [r for r in reqs if _module(r) not in imported]
              for extra, reqs in _extras().items() if extra not in TOOLS}
    assert not any(unused.values()), f"extras list packages nothing imports: {unused}"


def test_no_extra_lists_transformer_engine_or_flash_attn():
    listed = {_module(r) for reqs in _extras().values() for r in reqs}
    assert not listed & {"transformer_engine", "flash_attn"}
