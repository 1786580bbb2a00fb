"""Entry-point registries: built-in names, lazy listing, the example plugin's ``batchloo``, and broken plugins."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch import Tensor

from lvzoo import registry
from lvzoo.estimators import (
    BitVector,
    Categorical,
    Estimator,
    EstimatorConfig,
    IncompatibleSpaceError,
)
from lvzoo.registry import PluginLoadError, Registry, UnknownNameError
from lvzoo_example_plugin import BatchLOO, BatchLOOConfig
from tests.oracle import QuadraticDecoderLoss, exact_expectation, exact_gradient

BUILTIN_ESTIMATORS = frozenset(
    {
        "softmax", "sparsemax", "entmax15", "topksparse", "sparsemap",
        "sfe", "sfe+", "nvil", "sumsample", "rloo", "disarm",
        "gumbel", "stgumbel",
    }
)
BUILTIN_TASKS = frozenset({"ssvae", "signal", "bitvec"})
BUILTIN_MODELS = frozenset({"ssvae", "signal", "bitvec"})
BUILTINS: dict[str, frozenset[str]] = {
    "estimators": BUILTIN_ESTIMATORS,
    "tasks": BUILTIN_TASKS,
    "models": BUILTIN_MODELS,
}
REGISTRIES: dict[str, Registry[Any]] = {
    "estimators": registry.estimators,
    "tasks": registry.tasks,
    "models": registry.models,
}
#: Standard errors allowed between a Monte-Carlo mean and the exact value (two-sided p ~ 7e-6 per component).
TOLERANCE_STANDARD_ERRORS = 4.5


def _plugin_class() -> type[BatchLOO]:
    """The ``batchloo`` estimator, looked up through the registry (it must be the example plugin's class)."""
    cls = registry.estimators.load("batchloo")
    assert cls is BatchLOO
    return BatchLOO


# --- built-in names -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_every_builtin_name_is_listed(kind: str) -> None:
    names = REGISTRIES[kind].names()
    assert BUILTINS[kind] <= set(names), f"missing {kind}: {sorted(BUILTINS[kind] - set(names))}"
    assert names == sorted(names)


def test_listing_names_imports_no_plugin_module(tmp_path: Path) -> None:
    """``names()`` reads entry-point metadata only: no registered module (built-in or plugin) gets imported."""
    script = textwrap.dedent(
        """
        import json, sys
        from importlib.metadata import entry_points
        from lvzoo import registry
        groups = ("lvzoo.estimators", "lvzoo.tasks", "lvzoo.models")
        targets = {ep.module for group in groups for ep in entry_points(group=group)}
        before = set(sys.modules)
        listed = {kind: getattr(registry, kind).names() for kind in ("estimators", "tasks", "models")}
        imported = sorted(
            name for name in set(sys.modules) - before
            if name in targets or name.split(".")[0] in ("lvzoo", "lvzoo_example_plugin")
        )
        print(json.dumps({"listed": listed, "imported": imported, "targets": sorted(targets)}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["imported"] == []
    assert "lvzoo_example_plugin.batch_loo" in report["targets"]
    for kind, expected in BUILTINS.items():
        assert expected <= set(report["listed"][kind])


@pytest.mark.parametrize(
    ("kind", "name"), [(kind, name) for kind in sorted(BUILTINS) for name in sorted(BUILTINS[kind])]
)
def test_every_builtin_loads(kind: str, name: str) -> None:
    """Each built-in entry point imports and names the right kind of class."""
    from lvzoo.tasks.base import Task

    obj = REGISTRIES[kind].load(name)
    assert isinstance(obj, type)
    assert obj.__module__.startswith(f"lvzoo.{kind}.")
    if kind == "estimators":
        assert issubclass(obj, Estimator)
        assert issubclass(obj.config_class, EstimatorConfig)
        assert attrs.has(obj.config_class)
    elif kind == "tasks":
        assert issubclass(obj, Task)


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_load_all_has_no_builtin_failures(kind: str) -> None:
    loaded, failures = REGISTRIES[kind].load_all()
    assert failures == {}
    assert BUILTINS[kind] <= set(loaded)


# --- unknown names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_unknown_name_error_lists_available_names(kind: str) -> None:
    reg = REGISTRIES[kind]
    with pytest.raises(UnknownNameError) as caught:
        reg.load("no-such-thing")
    message = str(caught.value)
    assert "'no-such-thing'" in message
    for name in reg.names():
        assert name in message
    assert isinstance(caught.value, LookupError)


# --- broken plugins -------------------------------------------------------------------------------------------

BROKEN_MODULE = "lvzoo_test_plugin_broken"
WORKING_MODULE = "lvzoo_test_plugin_working"


@pytest.fixture
def broken_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary installed distribution registering one working, one unimportable, one missing estimator."""
    dist_info = tmp_path / "lvzoo_test_plugins-0.0.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: lvzoo-test-plugins\nVersion: 0.0.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[lvzoo.estimators]\n"
        f"zz_import_error = {BROKEN_MODULE}:Estimator\n"
        f"zz_missing_attribute = {WORKING_MODULE}:NoSuchEstimator\n"
        f"zz_working = {WORKING_MODULE}:WorkingEstimator\n"
    )
    (tmp_path / f"{BROKEN_MODULE}.py").write_text('raise RuntimeError("plugin exploded on import")\n')
    (tmp_path / f"{WORKING_MODULE}.py").write_text(
        "from lvzoo_example_plugin.batch_loo import BatchLOO as WorkingEstimator\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in (BROKEN_MODULE, WORKING_MODULE):
        sys.modules.pop(module, None)


def test_load_all_reports_broken_plugins_and_keeps_the_others(broken_plugins: Path) -> None:
    broken = {"zz_import_error", "zz_missing_attribute"}
    assert {"zz_working", *broken} <= set(registry.estimators.names())

    with pytest.warns(RuntimeWarning) as warned:
        loaded, failures = registry.estimators.load_all()

    assert loaded["zz_working"] is _plugin_class()
    assert "batchloo" in loaded
    assert {name for name in failures if name not in BUILTIN_ESTIMATORS} == broken
    import_error = failures["zz_import_error"]
    assert "zz_import_error" in import_error
    assert "RuntimeError" in import_error and "plugin exploded on import" in import_error
    missing = failures["zz_missing_attribute"]
    assert "zz_missing_attribute" in missing
    assert "AttributeError" in missing and "NoSuchEstimator" in missing
    warning_messages = {str(w.message) for w in warned}
    assert {import_error, missing} <= warning_messages


def test_loading_a_broken_plugin_is_not_an_unknown_name(broken_plugins: Path) -> None:
    with pytest.raises(PluginLoadError) as caught:
        registry.estimators.load("zz_import_error")
    assert not isinstance(caught.value, UnknownNameError)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert BROKEN_MODULE in str(caught.value)


# --- the example plugin: batchloo-----------------------------------------------------------------------------


class RecordingLoss:
    """Wraps a loss ``(z_rows [R, N], example_index [R]) -> [R]`` and records every call's inputs and outputs."""

    def __init__(self, loss: QuadraticDecoderLoss) -> None:
        self.loss = loss
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        losses: Tensor = self.loss(z_rows, example_index)
        self.calls.append((z_rows.detach(), example_index.detach(), losses.detach()))
        return losses


def test_plugin_is_a_registered_estimator_class() -> None:
    assert registry.estimators.load("batchloo") is BatchLOO
    assert "batchloo" in registry.estimators.names()
    assert issubclass(BatchLOO, Estimator)
    # the example stays a third-party example: core lvzoo does not register it
    assert not BatchLOO.__module__.startswith("lvzoo.")


def test_plugin_one_loss_call_and_result_contract() -> None:
    torch.manual_seed(0)
    batch, num_classes, num_samples = 3, 5, 6
    space = Categorical(num_classes)
    cls = _plugin_class()
    estimator = cls(space, BatchLOOConfig(num_samples=num_samples))
    scores = torch.randn(batch, num_classes, dtype=torch.float64, requires_grad=True)
    loss = RecordingLoss(QuadraticDecoderLoss(space, batch))

    result = estimator(scores, loss)

    assert len(loss.calls) == 1
    z_rows, example_index, losses = loss.calls[0]
    assert z_rows.shape == (batch * num_samples, num_classes)
    assert torch.equal(z_rows.sum(-1), torch.ones(batch * num_samples, dtype=torch.float64))
    assert torch.equal(example_index, torch.arange(batch).repeat_interleave(num_samples))
    assert torch.equal(result.support, torch.full((batch,), num_samples, dtype=torch.long))
    torch.testing.assert_close(result.objective, losses.reshape(batch, num_samples).mean(-1))
    assert not result.objective.requires_grad
    probs = torch.softmax(scores, -1)
    torch.testing.assert_close(result.entropy, -(probs * probs.log()).sum(-1))
    assert result.surrogate.shape == (batch,)
    (grad,) = torch.autograd.grad(result.surrogate.sum(), scores)
    assert torch.isfinite(grad).all()
    # the baseline of example b: the mean loss of the other examples' draws
    per_example = losses.reshape(batch, num_samples).sum(-1)
    expected = ((per_example.sum() - per_example) / ((batch - 1) * num_samples)).mean()
    torch.testing.assert_close(result.logs["baseline"], expected)


@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_plugin_config_rejects_fewer_than_one_sample(bad: Any) -> None:
    assert _plugin_class().config_class is BatchLOOConfig
    with pytest.raises(ValueError, match=r"num_samples must be an int >= 1.*got " + repr(bad)):
        BatchLOOConfig(num_samples=bad)


def test_plugin_refuses_bit_vectors() -> None:
    with pytest.raises(IncompatibleSpaceError, match="Categorical"):
        _plugin_class()(BitVector(4))


def _assert_unbiased(samples: Tensor, exact: Tensor) -> None:
    """``samples [M, ...]`` are i.i.d. unbiased estimates of ``exact [...]``: mean within the tolerance in SEs."""
    mean = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    assert (standard_error > 0).all()
    # The test only has power if the noise is small next to the gradient it checks.
    assert standard_error.max() < 0.1 * exact.abs().max()
    deviation = (mean - exact).abs() / standard_error
    assert deviation.max() < TOLERANCE_STANDARD_ERRORS, f"max deviation {deviation.max():.2f} standard errors"


def test_plugin_score_gradient_is_unbiased() -> None:
    """Per-draw gradients w.r.t. the scores average to the exact gradient (draws vectorised over a replicated batch)."""
    torch.manual_seed(1)
    batch, num_classes, draws = 3, 5, 4000
    space = Categorical(num_classes)
    loss = QuadraticDecoderLoss(space, batch, seed=2)
    scores = torch.randn(batch, num_classes, dtype=torch.float64)
    exact = exact_gradient(space, scores, lambda s: torch.softmax(s, -1), loss)

    estimator = _plugin_class()(space)
    replicated = scores.repeat(draws, 1).requires_grad_(True)  # row m * batch + b is draw m of example b
    result = estimator(replicated, lambda z, index: loss(z, index % batch))
    (grad,) = torch.autograd.grad(result.surrogate.sum(), replicated)

    _assert_unbiased(grad.reshape(draws, batch, num_classes), exact)


def test_plugin_decoder_gradient_is_unbiased() -> None:
    """Gradients w.r.t. the loss parameters, averaged over independent groups of draws, match the exact ones."""
    torch.manual_seed(3)
    batch, num_classes, groups, draws_per_group = 3, 5, 60, 50
    space = Categorical(num_classes)
    loss = QuadraticDecoderLoss(space, batch, seed=4)
    params = list(loss.parameters())
    scores = torch.randn(batch, num_classes, dtype=torch.float64)
    exact = torch.autograd.grad(exact_expectation(space, torch.softmax(scores, -1), loss).sum(), params)

    estimator = _plugin_class()(space)
    replicated = scores.repeat(draws_per_group, 1)
    group_grads = []
    for _ in range(groups):
        result = estimator(replicated, lambda z, index: loss(z, index % batch))
        grads = torch.autograd.grad(result.surrogate.sum() / draws_per_group, params)
        group_grads.append(torch.cat([g.reshape(-1) for g in grads]))

    _assert_unbiased(torch.stack(group_grads), torch.cat([g.reshape(-1) for g in exact]))
