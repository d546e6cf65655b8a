"""What `pip install` puts in site-packages: only `pdray` (issue 16). The repository's top-level
kernels/ and deployments/ install as pdray.kernels and pdray.deployments; code imports them by
those names only (a second, top-level copy of a module would have its own state)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_IMPORT = re.compile(r"^\s*(from|import)\s+(kernels|deployments)\b", re.M)


def _listed_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"pdray.kernels": "kernels", "pdray.deployments": "deployments"}
    return set(config["packages"])


def test_every_package_folder_is_listed():
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pdray").rglob("__init__.py")
    }
    assert _listed_packages() == found | {"pdray.kernels", "pdray.deployments"}


def test_nothing_imports_the_folders_as_top_level_packages():
    offenders = []
    for folder in ("pdray", "kernels", "deployments", "tests", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for match in TOP_LEVEL_IMPORT.finditer(path.read_text()):
                line = path.read_text()[: match.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, f"import pdray.kernels / pdray.deployments instead: {offenders}"
    config = (ROOT / "serve_config.yaml").read_text()
    assert "import_path: pdray.deployments.app:build_app" in config


@pytest.mark.timeout(300)
def test_the_wheel_holds_only_pdray(tmp_path):
    """Build the wheel as pip would (no dependencies, no isolation: setuptools is here), from a
    copy of what it packs, so the build leaves nothing in the checkout."""
    source = tmp_path / "source"
    for folder in ("pdray", "kernels", "deployments"):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("pdray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"pdray"}, top
    for module in ("pdray/kernels/fused.py", "pdray/deployments/app.py", "pdray/engine/loop.py"):
        assert module in names
