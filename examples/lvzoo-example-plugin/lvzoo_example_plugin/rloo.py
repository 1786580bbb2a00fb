"""REINFORCE with a leave-one-out baseline (RLOO) for a categorical latent variable.

Per example, ``n`` assignments ``z_1..z_n`` are drawn from ``pi = softmax(scores)`` and each is scored against the
mean loss of the other ``n - 1`` draws (Kool, van Hoof & Welling, 2019). The baseline of draw ``j`` does not depend
on ``z_j``, so the score-function term stays unbiased while its variance drops.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor
from torch.nn import functional as F

from lvzoo.estimators import Categorical, Estimator, EstimatorConfig, EstimatorResult, LossFn
from lvzoo.estimators.base import evaluate_rows
from lvzoo.estimators.validators import int_at_least


@attrs.frozen
class RLOOConfig(EstimatorConfig):
    """``num_samples``: draws per example (``>= 2``); each draw's baseline is the mean loss of the others."""

    num_samples: int = attrs.field(default=4, validator=int_at_least(2).because("the baseline leaves one draw out"))


class RLOO(Estimator[RLOOConfig]):
    """Score-function estimator with a leave-one-out baseline over ``Categorical`` spaces."""

    config_class = RLOOConfig
    supported_spaces = (Categorical,)

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, K]`` -> per-example results ``[B]``; one ``loss_fn`` call on ``B * num_samples`` rows.

        ``surrogate_b = mean_j [loss_j + (loss_j - mean_{i != j} loss_i).detach() * log pi(z_j)]``; its gradient
        is unbiased for ``E_pi[loss]`` w.r.t. the scores and the decoder parameters.
        """
        self.check_scores(scores)
        batch, num_classes = scores.shape
        n = self.config.num_samples
        log_probs = torch.log_softmax(scores, dim=-1)
        probs = log_probs.exp()
        with torch.no_grad():
            draws = torch.multinomial(probs, n, replacement=True)  # [B, n]
        z_rows = F.one_hot(draws.reshape(-1), num_classes).to(scores.dtype)  # [B * n, K]
        example_index = torch.arange(batch, device=scores.device).repeat_interleave(n)  # [B * n]
        losses = evaluate_rows(loss_fn, z_rows, example_index).reshape(batch, n)
        baselines = (losses.sum(-1, keepdim=True) - losses) / (n - 1)  # [B, n], leave-one-out means
        draw_log_probs = log_probs.gather(1, draws)  # [B, n]
        advantages = (losses - baselines).detach()
        surrogate = (losses + advantages * draw_log_probs).mean(-1)
        entropy = -(probs * log_probs).sum(-1)
        support = torch.full((batch,), n, dtype=torch.long, device=scores.device)
        return EstimatorResult(
            surrogate=surrogate,
            objective=losses.mean(-1).detach(),
            entropy=entropy,
            support=support,
            logs={"baseline": baselines.mean().detach()},
        )
