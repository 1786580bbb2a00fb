"""The encoder distribution pi(z | scores) of the sampling estimators (SFE family, Gumbel family).

Two factorial latent spaces are supported, each by one :class:`EncoderDistribution`:

- ``Categorical(K)``: ``pi = softmax(scores)``; assignments are one-hot rows ``[K]``.
- ``BitVector(D)`` without budget: independent ``Bernoulli(sigmoid(t_i))``; assignments are bit rows ``[D]``.
  With a budget the Gibbs distribution is not a product of Bernoullis, so :func:`require_factorial_space`
  refuses it.

Randomness: every sampler takes ``generator``, a ``torch.Generator`` on the scores' device, or ``None`` for the
default generator of that device (so ``torch.manual_seed`` makes the draws reproducible). Samples are drawn from
uniform noise with the Gumbel-max trick (categorical) or logistic noise (bits), so hard samples, relaxed samples
and the argmax/threshold of a relaxed sample all follow ``pi`` exactly.
"""

from __future__ import annotations

import abc
from typing import TypeVar

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from lvzoo.estimators.base import Estimator, EstimatorConfig, IncompatibleSpaceError
from lvzoo.estimators.spaces import BitVector, Categorical, LatentSpace


def require_factorial_space(space: LatentSpace, estimator_name: str) -> None:
    """Refuse latent spaces whose Gibbs distribution is not factorial (a :class:`BitVector` with a budget)."""
    if isinstance(space, BitVector) and space.budget is not None:
        raise IncompatibleSpaceError(
            f"{estimator_name} samples from independent Bernoullis, but {space!r} has budget={space.budget}: "
            "the Gibbs distribution restricted to ||z||_1 <= budget is not factorial. Use BitVector(D) without a "
            "budget, or a structured estimator (e.g. sparsemap) for budgeted bit vectors"
        )


def _uniform(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform noise in ``(0, 1)`` with the shape, dtype and device of ``like`` (never exactly 0)."""
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return u.clamp_min(torch.finfo(like.dtype).tiny)


def _gumbel(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard Gumbel noise shaped like ``like``."""
    return -torch.log(-torch.log(_uniform(like, generator)))


def _logistic(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard logistic noise shaped like ``like``."""
    u = _uniform(like, generator)
    return torch.log(u) - torch.log1p(-u)


@attrs.frozen
class TopKSplit:
    """The k most probable assignments and one draw from the remaining mass (for Sum&Sample).

    ``top_rows [B, k, N]``, their differentiable log-probabilities ``top_log_probs [B, k]``,
    ``complement_log_mass [B]`` = log(1 - sum of the top probabilities) (detached), and
    ``complement_sample [B, N]``: one assignment drawn from pi restricted to the complement and renormalised.
    """

    top_rows: Tensor
    top_log_probs: Tensor
    complement_log_mass: Tensor
    complement_sample: Tensor


class EncoderDistribution(abc.ABC):
    """``pi(z | scores)`` for scores ``[B, N]``; hard samples are detached float rows ``[B, N]``."""

    def __init__(self, scores: Tensor) -> None:
        self.scores = scores

    @abc.abstractmethod
    def sample(self, generator: torch.Generator | None) -> Tensor:
        """One exact sample per example, ``[B, N]`` (no gradient)."""

    @abc.abstractmethod
    def log_prob(self, z_rows: Tensor) -> Tensor:
        """``log pi(z_b)`` for hard rows ``z_rows [B, N]``, ``[B]``, differentiable w.r.t. the scores."""

    @abc.abstractmethod
    def entropy(self) -> Tensor:
        """Analytic entropy of pi, ``[B]``, differentiable."""

    @abc.abstractmethod
    def relaxed_sample(self, temperature: Tensor, generator: torch.Generator | None) -> Tensor:
        """Reparameterised relaxed sample at ``temperature`` (scalar tensor), ``[B, N]``, differentiable."""

    @abc.abstractmethod
    def harden(self, relaxed: Tensor) -> Tensor:
        """The hard assignment a relaxed sample ``[B, N]`` rounds to (argmax / threshold 0.5), ``[B, N]``."""

    @abc.abstractmethod
    def top_k_split(self, k: int, generator: torch.Generator | None) -> TopKSplit:
        """The ``k`` most probable assignments and a draw from the rest; see :class:`TopKSplit`."""

    def categories(self, z_rows: Tensor) -> Tensor | None:
        """The category of each hard one-hot row ``[R, N]`` -> ``[R]``, or ``None`` where rows are not one-hot."""
        return None

    def conditional_noise(self, hard: Tensor, samples: int, generator: torch.Generator | None) -> Tensor:
        """``samples`` draws of the relaxation noise conditioned on the hard sample it yields, ``[B, samples, N]``
        (detached): given exact hard rows ``hard [B, N]`` of pi, each draw is distributed as the noise whose
        argmax / threshold is ``hard`` (for Gumbel-Rao, Paulus, Maddison & Krause 2021)."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional relaxation noise")

    def relax(self, noise: Tensor, temperature: Tensor) -> Tensor:
        """The relaxed sample of given noise ``[B, ..., N]`` at ``temperature``, differentiable w.r.t. the scores:
        ``softmax((scores + noise) / tau)`` or ``sigmoid((t + noise) / tau)``, broadcasting the scores over ``...``."""
        raise NotImplementedError(f"{type(self).__name__} has no relaxation")


class CategoricalDistribution(EncoderDistribution):
    """``pi = softmax(scores)`` over ``K`` classes; assignments are one-hot rows."""

    def __init__(self, scores: Tensor) -> None:
        super().__init__(scores)
        self.log_probs = torch.log_softmax(scores, dim=-1)

    def _one_hot(self, index: Tensor) -> Tensor:
        """One-hot rows ``[..., K]`` in the scores' dtype for ``index [...]`` (a scatter: no integer-to-float copy and
        no host-side index range check, which ``F.one_hot`` does on the CPU)."""
        rows = self.scores.new_zeros(*index.shape, self.scores.shape[-1])
        return rows.scatter_(-1, index.unsqueeze(-1), 1.0)

    def sample(self, generator: torch.Generator | None) -> Tensor:
        logits = self.scores.detach()
        return self._one_hot((logits + _gumbel(logits, generator)).argmax(-1))

    def log_prob(self, z_rows: Tensor) -> Tensor:
        return (z_rows * self.log_probs).sum(-1)

    def entropy(self) -> Tensor:
        return -(self.log_probs.exp() * self.log_probs).sum(-1)

    def relaxed_sample(self, temperature: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = _gumbel(self.scores.detach(), generator)
        return torch.softmax((self.scores + noise) / temperature, dim=-1)

    def harden(self, relaxed: Tensor) -> Tensor:
        return self._one_hot(relaxed.detach().argmax(-1))

    def categories(self, z_rows: Tensor) -> Tensor:
        return z_rows.argmax(-1)

    def conditional_noise(self, hard: Tensor, samples: int, generator: torch.Generator | None) -> Tensor:
        """Gumbel noise ``G`` given ``argmax(scores + G) = k`` (``hard`` one-hot at ``k``), ``[B, samples, K]``.

        Given the argmax, the perturbed maximum is ``Gumbel(logsumexp(scores))`` and every other perturbed logit
        ``x_j`` is ``Gumbel(scores_j)`` truncated to ``x_j < max``, independently; inverting the truncated CDF with
        ``E_j = -log(u_j)`` gives ``x_j = scores_j - log(E_j + exp(scores_j - max))`` (computed in log space).
        """
        logits = self.scores.detach().unsqueeze(1)
        shape = (logits.shape[0], samples, logits.shape[-1])
        log_exponential = torch.log(-torch.log(_uniform(logits.expand(shape), generator)))
        chosen = hard.unsqueeze(1).expand(shape) > 0.5
        top_log_exponential = log_exponential.masked_fill(~chosen, 0.0).sum(-1, keepdim=True)
        maximum = torch.logsumexp(logits, -1, keepdim=True) - top_log_exponential
        below = logits - torch.logaddexp(log_exponential, logits - maximum)
        return torch.where(chosen, maximum, below) - logits

    def relax(self, noise: Tensor, temperature: Tensor) -> Tensor:
        scores = self.scores.reshape(self.scores.shape[0], *[1] * (noise.dim() - 2), self.scores.shape[-1])
        return torch.softmax((scores + noise) / temperature, dim=-1)

    def top_k_split(self, k: int, generator: torch.Generator | None) -> TopKSplit:
        logits = self.scores.detach()
        top_index = logits.topk(k, dim=-1).indices
        rest = logits.scatter(-1, top_index, float("-inf"))
        complement_log_mass = torch.logsumexp(rest, -1) - torch.logsumexp(logits, -1)
        drawn = (rest + _gumbel(rest, generator)).argmax(-1)
        return TopKSplit(
            top_rows=self._one_hot(top_index),
            top_log_probs=self.log_probs.gather(-1, top_index),
            complement_log_mass=complement_log_mass,
            complement_sample=self._one_hot(drawn),
        )


class BernoulliDistribution(EncoderDistribution):
    """Independent ``Bernoulli(sigmoid(t_i))`` over ``D`` bits; assignments are 0/1 rows."""

    def sample(self, generator: torch.Generator | None) -> Tensor:
        logits = self.scores.detach()
        return (logits + _logistic(logits, generator) > 0).to(logits.dtype)

    def log_prob(self, z_rows: Tensor) -> Tensor:
        t = self.scores
        return (z_rows * F.logsigmoid(t) + (1 - z_rows) * F.logsigmoid(-t)).sum(-1)

    def entropy(self) -> Tensor:
        t = self.scores
        p = torch.sigmoid(t)
        return (p * F.softplus(-t) + (1 - p) * F.softplus(t)).sum(-1)

    def relaxed_sample(self, temperature: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = _logistic(self.scores.detach(), generator)
        return torch.sigmoid((self.scores + noise) / temperature)

    def antithetic_pair(self, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Two exact samples ``(b, b_tilde)``, each ``[B, D]`` (no gradient), from one shared logistic noise ``eps``:
        ``b = 1[t + eps > 0]`` (as :meth:`sample`) and ``b_tilde = 1[t - eps > 0]`` (``-eps`` is logistic too).

        In uniform terms (``eps = logit(u)``): ``b = 1[1 - u < sigmoid(t)]``, ``b_tilde = 1[u < sigmoid(t)]``, the
        antithetic pair of ARM / DisARM (Yin & Zhou 2019; Dong, Mnih & Tucker 2020).
        """
        logits = self.scores.detach()
        noise = _logistic(logits, generator)
        return (logits + noise > 0).to(logits.dtype), (logits - noise > 0).to(logits.dtype)

    def harden(self, relaxed: Tensor) -> Tensor:
        return (relaxed.detach() > 0.5).to(relaxed.dtype)

    def conditional_noise(self, hard: Tensor, samples: int, generator: torch.Generator | None) -> Tensor:
        """Logistic noise ``L`` given ``1[t + L > 0] = hard``, ``[B, samples, D]``.

        With ``s = 2 hard - 1`` and ``a = s t`` the condition is ``s L > -a``; ``s L`` is logistic truncated to
        ``(-a, inf)``, i.e. ``logit(U)`` for ``U = sigmoid(-a) + sigmoid(a) V``, ``V`` uniform (in log space).
        """
        sign = (2.0 * hard - 1.0).unsqueeze(1)
        a = sign * self.scores.detach().unsqueeze(1)
        shape = (a.shape[0], samples, a.shape[-1])
        v = _uniform(a.expand(shape), generator)
        log_u = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(a) + torch.log(v))
        log_one_minus_u = F.logsigmoid(a) + torch.log1p(-v)
        return sign * (log_u - log_one_minus_u)

    def relax(self, noise: Tensor, temperature: Tensor) -> Tensor:
        scores = self.scores.reshape(self.scores.shape[0], *[1] * (noise.dim() - 2), self.scores.shape[-1])
        return torch.sigmoid((scores + noise) / temperature)

    def top_k_split(self, k: int, generator: torch.Generator | None) -> TopKSplit:
        """Top-1 only: the MAP ``m`` (bit i on iff t_i >= 0) and an exact draw from pi given ``z != m``.

        The draw needs no rejection: the first bit ``J`` where ``z`` differs from ``m`` has
        ``P(J = i | z != m) ∝ prod_{j<i} q_j * (1 - q_i)`` with ``q_i = P(z_i = m_i)``; bits before ``J`` copy
        ``m``, bit ``J`` flips it and later bits are drawn independently from pi.
        """
        if k != 1:
            raise ValueError(f"Sum&Sample on bit vectors supports top_k=1 (the MAP) only, got top_k={k}")
        t = self.scores
        logits = t.detach()
        map_bits = (logits >= 0).to(logits.dtype)
        log_match = F.logsigmoid(t.abs())  # log q_i, differentiable
        top_log_prob = log_match.sum(-1)
        detached_match = log_match.detach()
        before = torch.cumsum(detached_match, -1) - detached_match
        first_mismatch_logits = before + F.logsigmoid(-logits.abs())
        first_mismatch = (first_mismatch_logits + _gumbel(first_mismatch_logits, generator)).argmax(-1)
        position = torch.arange(logits.shape[-1], device=logits.device)
        cut = first_mismatch.unsqueeze(-1)
        fresh = self.sample(generator)
        drawn = torch.where(position < cut, map_bits, torch.where(position == cut, 1 - map_bits, fresh))
        complement_log_mass = torch.log(-torch.expm1(top_log_prob.detach()))
        return TopKSplit(
            top_rows=map_bits.unsqueeze(1),
            top_log_probs=top_log_prob.unsqueeze(1),
            complement_log_mass=complement_log_mass,
            complement_sample=drawn,
        )


def encoder_distribution(space: LatentSpace, scores: Tensor) -> EncoderDistribution:
    """The encoder distribution of ``space`` for scores ``[B, space.size]``."""
    if isinstance(space, Categorical):
        return CategoricalDistribution(scores)
    require_factorial_space(space, "encoder_distribution")
    return BernoulliDistribution(scores)


C = TypeVar("C", bound=EstimatorConfig)


class SamplingEstimator(Estimator[C]):
    """Base of the sampling estimators: refuses budgeted bit vectors and keeps the random generator.

    ``generator`` (optional, on the scores' device) drives every draw; ``None`` uses the device's default
    generator. It can also be assigned later as ``estimator.generator``.
    """

    def __init__(
        self,
        space: LatentSpace,
        config: C | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(space, config)
        require_factorial_space(space, type(self).__name__)
        self.generator = generator

    def distribution(self, scores: Tensor) -> EncoderDistribution:
        """Check ``scores [B, N]`` and wrap them in this space's encoder distribution."""
        self.check_scores(scores)
        return encoder_distribution(self.space, scores)
