"""The estimator contract (:mod:`lvzoo.estimators.base`), checked for every registered estimator.

The table is built at collection time: every name of the ``lvzoo.estimators`` entry-point group (built-ins and
installed plugins alike) crossed with a few small latent spaces, keeping the pairs whose constructor accepts the
space (an :class:`IncompatibleSpaceError` means "not this space"; any other construction error is kept in the
table and fails the tests, so a broken estimator is never silently skipped). Each property is one test function
parametrized over the whole table, with the estimator's default config:

- ``test_result_shapes_dtypes_and_gradients``: ``[B]`` results in the scores' dtype (support long), finite,
  objective detached, surrogate differentiable w.r.t. the scores and the loss's parameters, scalar logs;
- ``test_one_loss_call_and_support_counts``: one ``loss_fn`` call, ``[R, N]`` rows with in-range example
  indices, ``support[b]`` = rows evaluated for example ``b`` >= 1;
- ``test_exact_distribution_has_no_zero_probability_rows`` (exact estimators only): the rows of
  ``distribution(scores)`` are feasible, distinct assignments with probability > 0 summing to 1, and are exactly
  the rows the forward evaluates;
- ``test_state_dict_round_trip``: a fresh instance loaded with a trained instance's state dict behaves the same;
- ``test_device_and_dtype_follow_the_scores``: results on the scores' device, ``.to(float64)`` works;
- ``test_same_seed_same_result``: reproducible under a seed; estimators taking ``generator=`` draw from it only,
  exact (marginalizing) ones use no randomness at all;
- ``test_wrong_score_shape_is_a_clear_error``: ``ValueError`` naming the expected ``[B, N]`` and the received
  shape, before any loss call.

Estimators are built as ``cls(space[, generator=...])`` (``generator`` where the constructor takes it) and
every forward receives an ``encoder_input [B, 2, 3]`` (learned baselines such as NVIL size themselves from it).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import torch
from torch import Tensor, nn

from lvzoo import registry
from lvzoo.estimators.base import Estimator, EstimatorResult, IncompatibleSpaceError, MarginalizingEstimator
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace

SPACES: tuple[LatentSpace, ...] = (Categorical(5), BitVector(4), BitVector(4, budget=2))
BATCH = 4
#: ``encoder_input`` is ``[BATCH, 2, 3]``: flattened width 6.
INPUT_SHAPE = (2, 3)
TRAIN_STEPS = 3


def space_id(space: LatentSpace) -> str:
    """``K5``, ``D4``, ``D4b2``."""
    if isinstance(space, Categorical):
        return f"K{space.K}"
    return f"D{space.D}" if space.budget is None else f"D{space.D}b{space.budget}"


@attrs.frozen
class Pair:
    """One row of the table: a registered estimator ``name`` (class ``cls``) and a latent ``space``."""

    name: str
    cls: type[Estimator[Any]]
    space: LatentSpace

    @property
    def takes_generator(self) -> bool:
        """Whether the constructor takes a ``generator`` (then every draw must come from it)."""
        return "generator" in inspect.signature(self.cls.__init__).parameters

    @property
    def exact(self) -> bool:
        """Whether the estimator marginalizes exactly (no randomness, an explicit distribution)."""
        return issubclass(self.cls, MarginalizingEstimator)

    @property
    def id(self) -> str:
        return f"{self.name}-{space_id(self.space)}"


def _accepts(cls: type[Estimator[Any]], space: LatentSpace) -> bool:
    """Whether ``cls`` supports ``space``: its ``supported_spaces`` list the type and the constructor does not
    raise :class:`IncompatibleSpaceError` (other errors count as accepting, so the tests report them)."""
    if not isinstance(space, cls.supported_spaces):
        return False
    try:
        cls(space)
    except IncompatibleSpaceError:
        return False
    except Exception:
        return True
    return True


def compatible_pairs() -> list[Pair]:
    """Every (registered estimator, space in :data:`SPACES`) pair whose estimator accepts the space."""
    pairs: list[Pair] = []
    for name in registry.estimators.names():
        cls = registry.estimators.load(name)
        pairs.extend(Pair(name, cls, space) for space in SPACES if _accepts(cls, space))
    return pairs


PAIRS = compatible_pairs()
EXACT_PAIRS = [pair for pair in PAIRS if pair.exact]


def over(pairs: list[Pair]) -> pytest.MarkDecorator:
    """Parametrize a test over ``pairs`` (argument ``pair``), ids ``name-space``."""
    return pytest.mark.parametrize("pair", pairs, ids=[pair.id for pair in pairs])


class LinearSquaredLoss(nn.Module):
    """A real per-row loss: ``loss(z, b) = ||z W - y_b||^2 + ||z||^2``, ``W [N, 3]`` a parameter, targets ``y [B, 3]``.

    Computed in the rows' dtype, so it follows the scores' dtype.
    """

    def __init__(self, space: LatentSpace, batch: int = BATCH, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(space.size, 3, generator=g))
        self.register_buffer("targets", torch.randn(batch, 3, generator=g))

    def forward(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        targets: Tensor = self.targets  # type: ignore[assignment]
        mapped = z_rows @ self.weight.to(z_rows.dtype) - targets.to(z_rows.dtype)[example_index]
        return (mapped**2).sum(-1) + (z_rows**2).sum(-1)


@attrs.frozen
class Call:
    """One recorded loss call: the rows ``[R, N]`` (detached copy) and their example indices ``[R]``."""

    z_rows: Tensor
    example_index: Tensor


class RecordingLoss:
    """Wraps a loss and records every call (rows and example indices)."""

    def __init__(self, loss: LinearSquaredLoss) -> None:
        self.loss = loss
        self.calls: list[Call] = []

    def __call__(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        self.calls.append(Call(z_rows.detach().clone(), example_index.detach().clone()))
        losses: Tensor = self.loss(z_rows, example_index)
        return losses


def make_scores(space: LatentSpace, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    """Fixed scores ``[BATCH, N]``: random rows at scale 2.5 (sparse normalizers leave zeros), one row with a clear
    winner and one with near-ties."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(BATCH, space.size, generator=g, dtype=torch.float64) * 2.5
    scores[1] = torch.linspace(-3.0, 4.0, space.size, dtype=torch.float64)
    scores[2] = torch.linspace(-0.05, 0.05, space.size, dtype=torch.float64)
    return scores.to(dtype)


def make_inputs(dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed encoder inputs ``[BATCH, *INPUT_SHAPE]``."""
    return torch.randn(BATCH, *INPUT_SHAPE, generator=torch.Generator().manual_seed(99)).to(dtype)


def build(pair: Pair, seed: int = 0) -> tuple[Estimator[Any], torch.Generator | None]:
    """The estimator of ``pair`` (default config; parameters initialised under ``torch.manual_seed(seed)``) and the
    generator it was given (``None`` where its constructor takes none)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed) if pair.takes_generator else None
    kwargs: dict[str, Any] = {}
    if generator is not None:
        kwargs["generator"] = generator
    return pair.cls(pair.space, **kwargs), generator


def reseed(pair: Pair, generator: torch.Generator | None, seed: int, run: int) -> None:
    """Seed the randomness of the next forward with ``seed``. The global RNG is seeded with ``seed`` too, except
    for estimators that must not use it (those taking a generator, and exact ones): it then gets a seed that
    differs between runs, so any use of it shows up as a difference."""
    if generator is not None:
        generator.manual_seed(seed)
    uses_global_rng = not (pair.takes_generator or pair.exact)
    torch.manual_seed(seed if uses_global_rng else 1000 * (run + 1) + seed)


def forward(
    estimator: Estimator[Any], pair: Pair, scores: Tensor, loss: RecordingLoss | None = None
) -> tuple[EstimatorResult, Tensor]:
    """One forward on a copy of ``scores`` that requires a gradient; returns the result and the surrogate's
    gradient w.r.t. the scores."""
    leaf = scores.detach().clone().requires_grad_(True)
    loss = RecordingLoss(LinearSquaredLoss(pair.space).to(scores.device)) if loss is None else loss
    result = estimator(leaf, loss, make_inputs(scores.dtype).to(scores.device))
    (grad,) = torch.autograd.grad(result.surrogate.sum(), leaf, retain_graph=True)
    return result, grad


def assert_same(first: tuple[EstimatorResult, Tensor], second: tuple[EstimatorResult, Tensor]) -> None:
    """Bitwise-equal results (every field and log) and surrogate gradients."""
    (a, grad_a), (b, grad_b) = first, second
    for field in ("surrogate", "objective", "entropy", "support"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert set(a.logs) == set(b.logs)
    for key in a.logs:
        assert torch.equal(a.logs[key], b.logs[key]), key
    assert torch.equal(grad_a, grad_b)


def result_tensors(result: EstimatorResult) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a result, logs included, with its name."""
    for field in ("surrogate", "objective", "entropy", "support"):
        yield field, getattr(result, field)
    for key, value in result.logs.items():
        yield f"logs[{key}]", value


def test_table_covers_every_registered_estimator() -> None:
    """The table is the registry's: every registered name is compatible with at least one space of the table."""
    assert {pair.name for pair in PAIRS} == set(registry.estimators.names())
    assert EXACT_PAIRS and len(EXACT_PAIRS) < len(PAIRS)


@over(PAIRS)
def test_result_shapes_dtypes_and_gradients(pair: Pair) -> None:
    estimator, _ = build(pair)
    scores = make_scores(pair.space).requires_grad_(True)
    loss = LinearSquaredLoss(pair.space)
    result = estimator(scores, RecordingLoss(loss), make_inputs())

    for name in ("surrogate", "objective", "entropy"):
        value = getattr(result, name)
        assert isinstance(value, Tensor), name
        assert value.shape == (BATCH,), name
        assert value.dtype == scores.dtype, name
        assert bool(torch.isfinite(value).all()), name
    assert result.support.shape == (BATCH,) and result.support.dtype == torch.long
    assert not result.objective.requires_grad
    assert not result.support.requires_grad
    for key, value in result.logs.items():
        assert isinstance(value, Tensor) and value.dim() == 0, key
        assert not value.requires_grad, key
        assert bool(torch.isfinite(value)), key

    assert result.surrogate.requires_grad
    # autograd.grad raises unless both the scores and the loss's parameters are in the surrogate's graph (the
    # score gradient may legitimately be zero, e.g. SFE+ when both draws agree)
    score_grad, weight_grad = torch.autograd.grad(result.surrogate.sum(), [scores, loss.weight], retain_graph=True)
    assert score_grad.shape == scores.shape and bool(torch.isfinite(score_grad).all())
    assert bool(torch.isfinite(weight_grad).all()) and bool((weight_grad != 0).any())
    assert result.entropy.requires_grad
    (entropy_grad,) = torch.autograd.grad(result.entropy.sum(), scores)
    assert bool(torch.isfinite(entropy_grad).all())


@over(PAIRS)
def test_one_loss_call_and_support_counts(pair: Pair) -> None:
    estimator, _ = build(pair)
    scores = make_scores(pair.space)
    loss = RecordingLoss(LinearSquaredLoss(pair.space))
    result = estimator(scores, loss, make_inputs())

    assert len(loss.calls) == 1
    (call,) = loss.calls
    rows = call.z_rows.shape[0]
    assert call.z_rows.shape == (rows, pair.space.size) and rows >= BATCH
    assert call.z_rows.dtype == scores.dtype
    assert call.example_index.shape == (rows,) and call.example_index.dtype == torch.long
    assert bool(((call.example_index >= 0) & (call.example_index < BATCH)).all())
    assert torch.equal(result.support, torch.bincount(call.example_index, minlength=BATCH))
    assert bool((result.support >= 1).all())
    # a second forward is again exactly one call
    estimator(scores, loss, make_inputs())
    assert len(loss.calls) == 2


def is_feasible(space: LatentSpace, z_rows: Tensor) -> Tensor:
    """``[R]`` bool: which rows are assignments of ``space`` (one-hot; 0/1 bits within the budget)."""
    binary = ((z_rows == 0) | (z_rows == 1)).all(-1)
    if isinstance(space, Categorical):
        return binary & (z_rows.sum(-1) == 1)
    budget = space.D if space.budget is None else space.budget
    return binary & (z_rows.sum(-1) <= budget)


@over(EXACT_PAIRS)
def test_exact_distribution_has_no_zero_probability_rows(pair: Pair) -> None:
    estimator, _ = build(pair)
    assert isinstance(estimator, MarginalizingEstimator)
    scores = make_scores(pair.space, torch.float64)
    estimator = estimator.to(torch.float64)
    dist = estimator.distribution(scores)

    rows = dist.z_rows.shape[0]
    assert dist.num_examples == BATCH
    assert dist.z_rows.shape == (rows, pair.space.size) and dist.probs.shape == (rows,)
    assert dist.example_index.shape == (rows,) and dist.example_index.dtype == torch.long
    assert bool((dist.probs > 0).all()), dist.probs
    assert bool((dist.example_index[1:] >= dist.example_index[:-1]).all())  # non-decreasing
    assert bool(((dist.example_index >= 0) & (dist.example_index < BATCH)).all())
    totals = torch.zeros(BATCH, dtype=torch.float64).index_add(0, dist.example_index, dist.probs.detach())
    torch.testing.assert_close(totals, torch.ones(BATCH, dtype=torch.float64), rtol=0, atol=1e-9)
    assert bool(is_feasible(pair.space, dist.z_rows).all())
    for b in range(BATCH):
        mine = dist.z_rows[dist.example_index == b]
        assert torch.unique(mine, dim=0).shape[0] == mine.shape[0], f"example {b} lists an assignment twice"

    loss = RecordingLoss(LinearSquaredLoss(pair.space))
    result = estimator(scores, loss, make_inputs(torch.float64))
    (call,) = loss.calls
    assert torch.equal(call.z_rows, dist.z_rows) and torch.equal(call.example_index, dist.example_index)
    assert torch.equal(result.support, torch.bincount(dist.example_index, minlength=BATCH))


@over(PAIRS)
def test_state_dict_round_trip(pair: Pair) -> None:
    trained, trained_generator = build(pair, seed=0)
    scores = make_scores(pair.space)
    loss = LinearSquaredLoss(pair.space)
    parameters = list(trained.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.1) if parameters else None
    trained.train()
    for step in range(TRAIN_STEPS):
        reseed(pair, trained_generator, 10 + step, run=0)
        result = trained(scores, RecordingLoss(loss), make_inputs())
        if optimizer is not None:
            optimizer.zero_grad()
            result.surrogate.mean().backward()  # type: ignore[no-untyped-call]
            optimizer.step()

    fresh, fresh_generator = build(pair, seed=1)  # other initial parameters and generator
    fresh.load_state_dict(trained.state_dict())
    trained_state, fresh_state = trained.state_dict(), fresh.state_dict()
    assert set(fresh_state) == set(trained_state)
    for key, value in trained_state.items():
        assert torch.equal(fresh_state[key], value), key

    for mode, seed in (("eval", 20), ("train", 21), ("train", 22)):
        outputs = []
        for run, (estimator, generator) in enumerate(((trained, trained_generator), (fresh, fresh_generator))):
            estimator.train(mode == "train")
            reseed(pair, generator, seed, run)
            outputs.append(forward(estimator, pair, scores))
        assert_same(outputs[0], outputs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@over(PAIRS)
def test_device_and_dtype_follow_the_scores(pair: Pair, dtype: torch.dtype) -> None:
    estimator, _ = build(pair)
    moved = estimator.to(torch.float64) if dtype == torch.float64 else estimator
    assert moved is estimator
    scores = make_scores(pair.space, dtype)
    result, grad = forward(estimator, pair, scores)
    for name, value in result_tensors(result):
        assert value.device == scores.device, name
        if value.is_floating_point() and name in ("surrogate", "objective", "entropy"):
            assert value.dtype == dtype, name
    assert grad.dtype == dtype and bool(torch.isfinite(grad).all())
    for name, value in estimator.state_dict().items():
        assert value.device == scores.device, name
        if value.is_floating_point():
            assert value.dtype == dtype, name


@over(PAIRS)
def test_same_seed_same_result(pair: Pair) -> None:
    scores = make_scores(pair.space)
    outputs = []
    for run in range(2):
        estimator, generator = build(pair, seed=0)
        runs = []
        for seed in (5, 6):  # the state a training-mode forward leaves behind is reproducible too
            reseed(pair, generator, seed, run)
            runs.append(forward(estimator, pair, scores))
        outputs.append(runs)
    for first, second in zip(*outputs, strict=True):
        assert_same(first, second)
    estimator.eval()  # the second instance: in eval mode, two forwards under one seed agree
    reseed(pair, generator, 7, run=0)
    once = forward(estimator, pair, scores)
    reseed(pair, generator, 7, run=1)
    assert_same(once, forward(estimator, pair, scores))


def wrong_shapes(size: int) -> list[tuple[int, ...]]:
    """Score shapes that are not ``[B, size]``."""
    return [(BATCH, size + 1), (BATCH, size - 1), (size,), (BATCH, 1, size), (BATCH, size, 1)]


@over(PAIRS)
def test_wrong_score_shape_is_a_clear_error(pair: Pair) -> None:
    estimator, _ = build(pair)
    size = pair.space.size
    loss = RecordingLoss(LinearSquaredLoss(pair.space))
    for shape in wrong_shapes(size):
        scores = torch.zeros(shape)
        expected = re.escape(f"[B, {size}]") + ".*" + re.escape(str(shape))
        with pytest.raises(ValueError, match=expected):
            estimator(scores, loss, make_inputs())
    assert loss.calls == []
