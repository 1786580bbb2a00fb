"""REINFORCE with a batch leave-one-out baseline (``batchloo``) for a categorical latent variable.

Each example draws ``num_samples`` assignments from ``pi = softmax(scores)``; every draw of example ``b`` is
centred by the mean loss of the draws of the *other* examples of the batch. Those draws are independent of it, so
the score-function term stays unbiased, and unlike a moving average the baseline tracks the current parameters
(it needs no state). It helps when the examples of a batch have similar expected losses; with one example in the
batch the baseline is 0 (plain REINFORCE). lvzoo's own ``rloo`` leaves one *sample of the same example* out instead.
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
class BatchLOOConfig(EstimatorConfig):
    """``num_samples``: draws per example (``>= 1``); each is centred by the mean loss of the other examples."""

    num_samples: int = attrs.field(default=1, validator=int_at_least(1))


class BatchLOO(Estimator[BatchLOOConfig]):
    """Score-function estimator with a batch leave-one-out baseline over ``Categorical`` spaces."""

    config_class = BatchLOOConfig
    supported_spaces = (Categorical,)

    def forward(self, scores: Tensor, loss_fn: LossFn, encoder_input: Tensor | None = None) -> EstimatorResult:
        """Scores ``[B, K]`` -> per-example results ``[B]``; one ``loss_fn`` call on ``B * num_samples`` rows.

        ``surrogate_b = mean_j [loss_bj + (loss_bj - baseline_b).detach() * log pi(z_bj)]`` with ``baseline_b`` the
        mean loss over the draws of the examples ``!= b``; its gradient is unbiased for ``E_pi[loss]`` w.r.t. the
        scores and the decoder parameters.
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
        per_example = losses.detach().sum(-1)  # [B]
        others = max(batch - 1, 1) * n
        baselines = ((per_example.sum() - per_example) / others).unsqueeze(-1)  # [B, 1]; 0 when batch == 1
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
            logs={"baseline": baselines.mean()},
        )
