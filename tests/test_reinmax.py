"""ReinMax (Liu et al., NeurIPS 2023): the closed-form gradient, exactness of its second-order (trapezoidal) rule on
quadratic losses at tau = 1, and its measured bias against the exact gradient on the non-quadratic test loss.

Measured (20k draws per example, 3 examples, float64, ``QuadraticDecoderLoss``; score-gradient bias /
decoder-gradient bias as ``||mean - exact|| / ||exact||``; standard errors about 0.005-0.008 / 0.007-0.018):

==================  ===========  ===========  ===========  ===============================
space               tau=2.0      tau=1.0      tau=0.5      stgumbel tau=1.0 (same protocol)
==================  ===========  ===========  ===========  ===============================
Categorical(5)      0.43 / 0.02  0.34 / 0.02  0.31 / 0.02  0.56 / 0.02
BitVector(3)        0.23 / 0.01  0.14 / 0.01  0.34 / 0.01  0.41 / 0.01
==================  ===========  ===========  ===========  ===============================

The decoder gradient is unbiased (the loss sees exact samples of pi). Asserted: the gradient formula, unbiasedness
on a quadratic loss at tau = 1 (with the power check that tau = 2 is rejected on the same loss), a detectable bias
on the non-quadratic loss and an unbiased decoder gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lvzoo import registry
from lvzoo.estimators.base import IncompatibleSpaceError
from lvzoo.estimators.reinmax import ReinMax, ReinMaxConfig
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace
from tests.oracle import QuadraticDecoderLoss, exact_gradient, gibbs_probs
from tests.test_score_function import (
    EXAMPLES,
    SPACES,
    Z_MAX,
    draw_gradients,
    exact_decoder_gradient,
    make_scores,
    max_z_score,
    seeded_gradient_problem,
)


class QuadraticFormLoss(QuadraticDecoderLoss):
    """``loss(z, b) = ||z W + c - y_b||^2 + <z, u_b>``: the test loss without its ``tanh``, so quadratic in z, where
    the trapezoidal rule (Heun's method) is exact."""

    def forward(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        z = z_rows.to(self.weight.dtype)
        targets: Tensor = self.targets  # type: ignore[assignment]
        tilts: Tensor = self.tilts  # type: ignore[assignment]
        out = z @ self.weight + self.bias - targets[example_index]
        return (out**2).sum(-1) + (z * tilts[example_index]).sum(-1)


def test_reinmax_is_registered() -> None:
    assert registry.estimators.load("reinmax") is ReinMax
    assert ReinMaxConfig().temperature == 1.0


@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("space", SPACES, ids=str)
def test_gradient_is_the_papers_formula(space: LatentSpace, tau: float) -> None:
    """For a linear loss ``<c, z>`` the score gradient is ``2 J(pi1) c - J(pi0) c / 2`` at the drawn sample."""
    scores = make_scores(space).requires_grad_(True)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.7], dtype=torch.float64)[: space.size]
    seen: list[Tensor] = []

    def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
        seen.append(z_rows.detach())
        return (z_rows * weights).sum(-1)

    result = ReinMax(space, ReinMaxConfig(temperature=tau))(scores, loss_fn)
    (grad,) = torch.autograd.grad(result.surrogate.sum(), scores)
    (hard,) = seen
    logits = scores.detach()
    if isinstance(space, Categorical):
        pi0, pi_tau = torch.softmax(logits, -1), torch.softmax(logits / tau, -1)
        pi1 = (hard + pi_tau) / 2

        def jacobian(p: Tensor) -> Tensor:
            return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

        expected = ((2 * jacobian(pi1) - 0.5 * jacobian(pi0)) @ weights.unsqueeze(-1)).squeeze(-1)
    else:
        p0, p1 = torch.sigmoid(logits), (hard + torch.sigmoid(logits / tau)) / 2
        expected = (2 * p1 * (1 - p1) - 0.5 * p0 * (1 - p0)) * weights
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(result.objective, (hard * weights).sum(-1))
    assert float(result.logs["temperature"]) == tau


@pytest.mark.parametrize("space", [*SPACES, BitVector(5)], ids=str)
def test_unbiased_on_quadratic_losses_at_unit_temperature(space: LatentSpace) -> None:
    torch.manual_seed(0)
    scores = make_scores(space)
    decoder = QuadraticFormLoss(space, EXAMPLES)
    exact = exact_gradient(space, scores, lambda s: gibbs_probs(space, s), decoder)
    draws, decoder_draws = draw_gradients(ReinMax(space), scores, decoder, replicas=2000, groups=10)
    assert exact.abs().max() > 0.05
    assert max_z_score(draws, exact) < Z_MAX
    assert max_z_score(decoder_draws, exact_decoder_gradient(space, scores, decoder)) < Z_MAX
    # power: another temperature is biased on the same loss, and the check sees it
    other, _ = draw_gradients(ReinMax(space, ReinMaxConfig(temperature=2.0)), scores, decoder, 2000, 10)
    assert max_z_score(other, exact) > Z_MAX


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_biased_scores_but_unbiased_decoder_gradient_on_a_non_quadratic_loss(space: LatentSpace) -> None:
    scores, decoder, exact = seeded_gradient_problem(space)
    draws, decoder_draws = draw_gradients(ReinMax(space), scores, decoder, replicas=2000, groups=10)
    assert max_z_score(draws, exact) > Z_MAX
    assert max_z_score(decoder_draws, exact_decoder_gradient(space, scores, decoder)) < Z_MAX


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_rows_seen_by_the_loss_are_exact_samples(space: LatentSpace) -> None:
    replicas = 10000
    scores = make_scores(space).repeat(replicas, 1).requires_grad_(True)
    decoder = QuadraticDecoderLoss(space, scores.shape[0])
    seen: list[Tensor] = []

    def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
        seen.append(z_rows)
        loss: Tensor = decoder(z_rows, example_index)
        return loss

    torch.manual_seed(2)
    result = ReinMax(space)(scores, loss_fn)
    (rows,) = seen
    assert rows.requires_grad and decoder.calls == 1
    hard = rows.detach()
    assert torch.all((hard == 0) | (hard == 1))
    if isinstance(space, Categorical):
        assert torch.all(hard.sum(-1) == 1)
    table = space.enumerate().to(scores)
    hits = (hard[0::EXAMPLES].unsqueeze(1) == table.unsqueeze(0)).all(-1).to(scores.dtype)
    assert max_z_score(hits, gibbs_probs(space, scores[:1].detach())[0]) < Z_MAX
    assert torch.equal(result.support, torch.ones(scores.shape[0], dtype=torch.long))
    torch.testing.assert_close(result.objective, decoder(hard, torch.arange(scores.shape[0])).detach())
    exact_entropy = -(gibbs_probs(space, scores) * gibbs_probs(space, scores).log()).sum(-1)
    torch.testing.assert_close(result.entropy, exact_entropy)


def test_extreme_scores_give_finite_gradients() -> None:
    for space in (Categorical(3), BitVector(3)):
        scores = torch.tensor([[60.0, -60.0, 0.0], [-90.0, 90.0, 3.0]]).requires_grad_(True)
        result = ReinMax(space, ReinMaxConfig(temperature=0.1))(scores, lambda z, i: (z**2).sum(-1) + z[:, 0])
        (grad,) = torch.autograd.grad(result.surrogate.sum(), scores)
        assert bool(torch.isfinite(grad).all())


def test_refusals_and_config_errors() -> None:
    with pytest.raises(IncompatibleSpaceError, match="budget=2"):
        ReinMax(BitVector(4, budget=2))
    for bad in (0, -1.0, True, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a number > 0"):
            ReinMaxConfig(temperature=bad)
    with pytest.raises(TypeError, match="expects a ReinMaxConfig"):
        ReinMax(BitVector(2), object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        ReinMax(Categorical(3))(torch.zeros(2, 4), QuadraticDecoderLoss(Categorical(3), 2))
