"""Shared fixtures: one migrated MLflow sqlite store per test session, an isolated working directory and a
single-threaded torch.

Creating an MLflow sqlite database runs its schema migrations, which take seconds; every test that tracks runs
shares the one store created here (runs are distinct by id), and tests that need their own database copy the
migrated file instead of migrating again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest


@attrs.frozen
class MlflowStore:
    """A migrated sqlite tracking store: ``uri`` (``sqlite:///...``), its ``db_path`` and folder ``root``.

    ``template`` is an empty migrated database file that tests copy when they need a store of their own.
    """

    root: Path
    db_path: Path
    template: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db_path}"

    def copy_to(self, directory: Path, name: str = "mlflow.db") -> Path:
        """Copy the empty migrated database into ``directory`` (a fresh store without a migration)."""
        target = directory / name
        shutil.copyfile(self.template, target)
        return target


@pytest.fixture(scope="session")
def _migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated database file (never written to by tests)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow_template")
    db_path = root / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{db_path}").search_experiments()
    return db_path


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory, _migrated_template: Path) -> MlflowStore:
    """The session's shared tracking store (artifacts go to ``<root>/mlruns``)."""
    root = tmp_path_factory.mktemp("mlflow_store")
    db_path = root / "mlflow.db"
    shutil.copyfile(_migrated_template, db_path)
    return MlflowStore(root=root, db_path=db_path, template=_migrated_template)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch intra-op thread during the test (small tensors, shared machine); the setting is restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh current directory; ``LVZOO_DATA`` unset and progress bars off (``CI=true``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LVZOO_DATA", raising=False)
    monkeypatch.setenv("CI", "true")
    yield tmp_path


#: Entry points that register the runner tests' toy task and estimator (``tests/runner_toy.py``).
TOY_ENTRY_POINTS = {
    "lvzoo.tasks": ("toy", "tests.runner_toy:ToyTask"),
    "lvzoo.estimators": ("tempered", "tests.runner_toy:TemperedSoftmax"),
}


@pytest.fixture
def toy_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register ``toy`` (task) and ``tempered`` (estimator) next to the installed entry points."""
    from importlib.metadata import EntryPoint, entry_points

    import lvzoo.registry
    import lvzoo.runners.plan

    def with_toys(group: str) -> list[EntryPoint]:
        found = list(entry_points(group=group))
        if group in TOY_ENTRY_POINTS:
            name, value = TOY_ENTRY_POINTS[group]
            found.append(EntryPoint(name=name, value=value, group=group))
        return found

    monkeypatch.setattr(lvzoo.registry, "entry_points", with_toys)
