"""Packaging: the wheel holds only the ``lvzoo`` namespace, declares the entry points, and imports when installed.

The wheel is built by ``pip wheel`` with build isolation, i.e. with the ``[build-system]`` requirements that
pyproject declares, fetched from the configured package index (a fresh ``python3 -m venv`` ships setuptools 65,
which cannot build wheels without the ``wheel`` package, so ``--no-build-isolation`` would test the venv, not the
project). It is built from a copy of the files the build reads, so the repository tree (``build/``,
``*.egg-info``) is left untouched while others work in it.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
#: Import name -> source folder, e.g. ``"lvzoo.estimators" -> "estimators"``.
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
SUBPACKAGE_FOLDERS = sorted(folder for name, folder in PACKAGE_DIRS.items() if name != "lvzoo")
ENTRY_POINT_GROUPS = ("lvzoo.estimators", "lvzoo.tasks", "lvzoo.models")
BUILD_TIMEOUT_S = 300
#: Top-level files setuptools may read besides the package folders (the readme is added from pyproject).
BUILD_FILE_PATTERNS = (
    "pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "LICEN[CS]E*", "COPYING*", "NOTICE*", "AUTHORS*"
)


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _copy_build_inputs(destination: Path) -> None:
    """Copy what setuptools reads: pyproject, readme, license files and every mapped package folder."""
    destination.mkdir()
    files = {REPO / PYPROJECT["project"]["readme"]}
    for pattern in BUILD_FILE_PATTERNS:
        files.update(REPO.glob(pattern))
    for path in files:
        shutil.copy2(path, destination / path.name)
    for folder in sorted(set(PACKAGE_DIRS.values())):
        shutil.copytree(REPO / folder, destination / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.fixture(scope="module")
def build_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the build inputs (the wheel is built from, and compared with, this copy)."""
    source = tmp_path_factory.mktemp("wheel-source") / "source"
    _copy_build_inputs(source)
    return source


@pytest.fixture(scope="module")
def wheel(build_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lvzoo wheel, built with the declared build backend (see the module docstring)."""
    out = tmp_path_factory.mktemp("wheel-dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(build_source)], cwd=out)
    (built,) = out.glob("lvzoo-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _dist_info(wheel_names: list[str]) -> str:
    (dist_info,) = {name.split("/")[0] for name in wheel_names if name.split("/")[0].endswith(".dist-info")}
    return dist_info


def test_wheel_holds_only_the_lvzoo_namespace(wheel_names: list[str]) -> None:
    top_level = {name.split("/")[0] for name in wheel_names}
    dist_info = _dist_info(wheel_names)
    assert dist_info.startswith("lvzoo-")
    assert top_level == {"lvzoo", dist_info}
    for folder in SUBPACKAGE_FOLDERS:
        assert not any(name.startswith(f"{folder}/") for name in wheel_names), f"top-level {folder}/ in wheel"
        assert f"lvzoo/{folder}/__init__.py" in wheel_names
    assert "lvzoo/__init__.py" in wheel_names
    assert "lvzoo/py.typed" in wheel_names


def test_wheel_ships_every_source_module(build_source: Path, wheel_names: list[str]) -> None:
    """Every ``.py`` under a mapped folder (subfolders included) lands under its ``lvzoo.*`` package."""
    shipped = set(wheel_names)
    for name, folder in PACKAGE_DIRS.items():
        prefix = name.replace(".", "/")
        sources = sorted((build_source / folder).rglob("*.py"))
        assert sources, f"no modules found in {folder}/"
        for path in sources:
            relative = path.relative_to(build_source / folder).as_posix()
            assert f"{prefix}/{relative}" in shipped, f"{folder}/{relative} is missing from the wheel"


def test_wheel_declares_the_pyproject_entry_points(wheel: Path, wheel_names: list[str]) -> None:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"{_dist_info(wheel_names)}/entry_points.txt").decode()
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep names case-sensitive
    parser.read_string(text)
    declared: dict[str, dict[str, str]] = PYPROJECT["project"]["entry-points"]
    for group in ENTRY_POINT_GROUPS:
        assert parser.has_section(group), f"group {group} missing from entry_points.txt"
        assert dict(parser[group]) == declared[group]
        assert all(target.startswith(f"{group}.") for target in declared[group].values())
    assert dict(parser["console_scripts"]) == PYPROJECT["project"]["scripts"]


def _import_report(cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Import every lvzoo package in a fresh interpreter; report their files and whether ``estimators`` imports."""
    script = textwrap.dedent(
        f"""
        import importlib, json
        names = {sorted(PACKAGE_DIRS)!r}
        files = {{name: importlib.import_module(name).__file__ for name in names}}
        try:
            import estimators
            bare = estimators.__file__
        except ModuleNotFoundError:
            bare = None
        print(json.dumps({{"files": files, "bare_estimators": bare}}))
        """
    )
    done = _run([sys.executable, "-c", script], cwd=cwd, env=env)
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_installed_wheel_imports_from_its_target(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        cwd=tmp_path,
    )
    neutral = tmp_path / "cwd"
    neutral.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    report = _import_report(neutral, env)

    for name, file in report["files"].items():
        assert Path(file).resolve().is_relative_to(target.resolve()), f"{name} imported from {file}"
    assert Path(report["files"]["lvzoo.estimators"]).resolve() == (target / "lvzoo/estimators/__init__.py").resolve()
    assert report["bare_estimators"] is None


def test_editable_install_maps_packages_to_repository_folders(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    report = _import_report(tmp_path, env)

    for name, folder in PACKAGE_DIRS.items():
        assert Path(report["files"][name]).resolve() == (REPO / folder / "__init__.py").resolve()
    assert report["bare_estimators"] is None
