"""Sender and receiver of the referential signalling game (Lazaridou et al. 2017, as in the paper's code).

Shapes: ``B`` games, ``C`` candidates, ``F`` feature width, ``E`` embedding size, ``H`` hidden size, ``V``
vocabulary size, ``R`` loss rows (one message each).

Sender (sees the target only): ``e = W1 x`` (``F -> E``, no bias); then the "informed sender" stack of the code
(a 1x1 convolution with ``H`` filters, sigmoid, an ``(H, 1)`` convolution back to one channel, sigmoid). For a
single image that stack acts on each of the ``E`` embedding coordinates separately with the same weights, so it
is exactly a shared per-coordinate network ``g(e_j) = sigmoid(sum_k v_k sigmoid(w_k e_j))`` with ``H`` hidden
units and no biases, implemented here as such (a fused autograd function that stores no ``[B, E, H]`` tensor);
then ``scores = W4 g(e) / tau_s`` (``E -> V``, no bias, sender temperature ``tau_s``). The code applies a
log-softmax afterwards; it is omitted because every estimator normalizes the scores itself and softmax/sparsemax
are shift-invariant.

Receiver: ``u_c = W x_c`` for every candidate (``F -> E``, no bias, computed once per batch) and a symbol
embedding ``M [V, E]`` (``N(0, 1)`` initialised like the code's ``nn.Embedding``); a message row ``z [V]``
(one-hot or relaxed) is embedded as ``z @ M`` and scores candidate ``c`` by ``<u_c, z @ M>``; log-softmax over
the ``C`` candidates.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _CoordinateNetwork(torch.autograd.Function):
    """``g(e) = sigmoid(sum_k v_k sigmoid(w_k e))`` for every entry of ``e [B, E]``, with ``w, v [H]``.

    Autograd would keep four ``[B, E, H]`` intermediates and pass over them about ten times; this forward keeps only
    ``e`` and ``g``, and the backward recomputes ``s = sigmoid(w e)`` once and reads it with three matrix-vector
    products. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, embedded: Tensor, hidden_weight: Tensor, mix_weight: Tensor) -> Tensor:
        hidden = torch.sigmoid_(torch.outer(embedded.reshape(-1), hidden_weight))  # [B*E, H]
        mixed = torch.sigmoid_(hidden @ mix_weight).view_as(embedded)
        ctx.save_for_backward(embedded, hidden_weight, mix_weight, mixed)
        return mixed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_mixed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        embedded, hidden_weight, mix_weight, mixed = ctx.saved_tensors
        flat = embedded.reshape(-1)
        grad_pre = (grad_mixed * mixed * (1.0 - mixed)).reshape(-1)  # d loss / d (sum_k v_k s_k), [B*E]
        hidden = torch.sigmoid_(torch.outer(flat, hidden_weight))  # s, [B*E, H]
        grad_mix = hidden.T @ grad_pre
        slope = hidden.addcmul_(hidden, hidden, value=-1.0)  # s (1 - s), in place
        grad_embedded = (slope @ (mix_weight * hidden_weight)) * grad_pre
        grad_hidden = mix_weight * (slope.T @ (grad_pre * flat))
        return grad_embedded.view_as(embedded), grad_hidden, grad_mix


class Sender(nn.Module):
    """Target features ``[B, F]`` -> vocabulary scores ``[B, V]``."""

    def __init__(
        self, feature_dim: int, vocab_size: int, hidden_size: int, embedding_size: int, temperature: float
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.image_embedding = nn.Linear(feature_dim, embedding_size, bias=False)
        # The two convolutions of the code, with PyTorch's Conv2d default init (fan-in 1, then fan-in H).
        self.hidden_weight = nn.Parameter(torch.empty(hidden_size).uniform_(-1.0, 1.0))
        bound = 1.0 / math.sqrt(hidden_size)
        self.mix_weight = nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound))
        self.vocab_projection = nn.Linear(embedding_size, vocab_size, bias=False)

    def forward(self, target_features: Tensor) -> Tensor:
        """Scores ``[B, V]`` of the target features ``[B, F]``."""
        embedded = self.image_embedding(target_features)  # [B, E]
        mixed: Tensor = _CoordinateNetwork.apply(embedded, self.hidden_weight, self.mix_weight)  # [B, E]
        scores: Tensor = self.vocab_projection(mixed) / self.temperature
        return scores


class Receiver(nn.Module):
    """Embeds candidates once per batch, then scores candidates against messages without copying candidates.

    Two formulations with the same values and gradients: :meth:`all_symbol_logits` scores every symbol against
    every candidate once per batch (``[B, V, C]``, for one-hot rows, which then only gather), and
    :meth:`row_logits` scores arbitrary (relaxed or straight-through) rows with one grouped product.
    """

    def __init__(self, feature_dim: int, vocab_size: int, embedding_size: int) -> None:
        super().__init__()
        self.image_embedding = nn.Linear(feature_dim, embedding_size, bias=False)
        self.symbol_embedding = nn.Embedding(vocab_size, embedding_size)

    def embed_candidates(self, candidates: Tensor) -> Tensor:
        """Candidate features ``[B, C, F]`` -> embeddings ``[B, C, E]``."""
        embedded: Tensor = self.image_embedding(candidates)
        return embedded

    def all_symbol_logits(self, candidate_embeddings: Tensor) -> Tensor:
        """``<u_bc, M_v>`` for every example, symbol and candidate: ``[B, V, C]`` from embeddings ``[B, C, E]``."""
        weight = self.symbol_embedding.weight.to(candidate_embeddings.dtype)  # [V, E]
        return torch.matmul(weight, candidate_embeddings.transpose(1, 2))

    def row_logits(self, candidate_embeddings: Tensor, z_rows: Tensor, example_index: Tensor) -> Tensor:
        """Candidate logits ``[R, C]`` of message rows ``z_rows [R, V]`` (any values) of ``example_index [R]``.

        The rows' messages ``z @ M`` are placed in per-example slots ``[B, S, E]`` (S = most rows of one example)
        and scored with one batched product against ``[B, C, E]``: no row ever copies its candidates. Reading
        ``S`` is one host synchronisation.
        """
        batch = candidate_embeddings.shape[0]
        message = z_rows.to(self.symbol_embedding.weight.dtype) @ self.symbol_embedding.weight  # [R, E]
        message = message.to(candidate_embeddings.dtype)
        rows = example_index.shape[0]
        counts = torch.zeros(batch, dtype=torch.long, device=example_index.device)
        counts.index_add_(0, example_index, torch.ones_like(example_index))
        first = torch.cumsum(counts, 0) - counts  # [B] where each example's rows start once sorted
        sorted_index, order = torch.sort(example_index, stable=True)
        slot = torch.empty_like(example_index)
        slot[order] = torch.arange(rows, device=example_index.device) - first[sorted_index]
        slots = int(counts.max()) if rows else 0
        padded = message.new_zeros(batch, slots, message.shape[1]).index_put((example_index, slot), message)
        logits = torch.bmm(padded, candidate_embeddings.transpose(1, 2))  # [B, S, C]
        return logits[example_index, slot]


#: The training losses a task can choose, and every kind :class:`GameLoss` computes.
TrainingLoss = Literal["nll", "zero_one"]
GameLossKind = Literal[TrainingLoss, "greedy_error"]
TRAINING_LOSSES: tuple[TrainingLoss, ...] = ("nll", "zero_one")


class GameLoss:
    """The row loss of one batch of games: a :class:`~lvzoo.estimators.base.LossFn` with ``of_categories``.

    ``kind``:

    - ``"nll"``: ``-log p(target | candidates, z)`` (the paper's default loss);
    - ``"zero_one"``: the paper's 0/1 loss: the receiver *samples* its guess ``c ~ p(. | candidates, z)`` (global
      RNG) and the row's value is ``1[c != target]``; the receiver learns by the score function, its gradient is
      ``(1[c != target] - b) grad log p(c | ...)`` with the baseline ``b = 1 - p(target | ...)`` (the expected 0/1
      loss given this message, detached: unbiased). The sender's estimator sees the 0/1 values, so with SFE
      the two log-probabilities share one score-function term, as in the paper's SFE (0/1) rows;
    - ``"greedy_error"``: ``1[argmax_c p(c | ...) != target]`` without gradient (exact expected success).

    Rows are scored with :meth:`Receiver.row_logits` (any rows) or, for one-hot rows, gathered from
    :meth:`Receiver.all_symbol_logits`, computed once per batch; both give the same values and gradients.
    """

    def __init__(
        self, receiver: Receiver, candidate_embeddings: Tensor, target: Tensor, kind: GameLossKind = "nll"
    ) -> None:
        self.receiver = receiver
        self.candidate_embeddings = candidate_embeddings
        self.target = target
        self.kind = kind
        self._all_log_probs: Tensor | None = None

    def all_log_probs(self) -> Tensor:
        """``log p(c | candidates_b, symbol v)``, ``[B, V, C]`` (computed on first use, then reused; a value computed
        without gradients is recomputed when gradients are enabled)."""
        stale = self._all_log_probs is not None and torch.is_grad_enabled() and not self._all_log_probs.requires_grad
        if self._all_log_probs is None or stale:
            logits = self.receiver.all_symbol_logits(self.candidate_embeddings)
            self._all_log_probs = F.log_softmax(logits, dim=-1)
        return self._all_log_probs

    def category_log_probs(self, categories: Tensor, example_index: Tensor) -> Tensor:
        """Candidate log-probabilities ``[R, C]`` of the one-hot messages ``categories [R]`` of ``example_index``."""
        return self.all_log_probs()[example_index, categories]

    def __call__(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        """Row losses ``[R]`` of message rows ``z_rows [R, V]`` (one-hot or relaxed)."""
        logits = self.receiver.row_logits(self.candidate_embeddings, z_rows, example_index)
        return self._losses(F.log_softmax(logits, dim=-1), example_index)

    def of_categories(self, categories: Tensor, example_index: Tensor) -> Tensor:
        """Row losses ``[R]`` of the constant one-hot rows of ``categories [R]`` (gathered, no row products)."""
        return self._losses(self.category_log_probs(categories, example_index), example_index)

    def _losses(self, log_probs: Tensor, example_index: Tensor) -> Tensor:
        target = self.target.index_select(0, example_index).unsqueeze(1)  # [R, 1]
        if self.kind == "nll":
            return -log_probs.gather(1, target).squeeze(1)
        if self.kind == "greedy_error":
            return (log_probs.argmax(-1, keepdim=True) != target).squeeze(1).to(log_probs.dtype)
        guess = torch.multinomial(log_probs.detach().exp(), 1)  # [R, 1]
        wrong = (guess != target).squeeze(1).to(log_probs.dtype)
        guess_log_prob = log_probs.gather(1, guess).squeeze(1)
        baseline = 1.0 - log_probs.detach().gather(1, target).squeeze(1).exp()
        return wrong + (wrong - baseline) * (guess_log_prob - guess_log_prob.detach())


class SignalGameModel(nn.Module):
    """The sender/receiver pair (see the module docstring); ``feature_dim`` is the image feature width."""

    def __init__(
        self,
        feature_dim: int,
        vocab_size: int = 256,
        hidden_size: int = 512,
        embedding_size: int = 256,
        sender_temperature: float = 10.0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.sender = Sender(feature_dim, vocab_size, hidden_size, embedding_size, sender_temperature)
        self.receiver = Receiver(feature_dim, vocab_size, embedding_size)

    def forward(self, target_features: Tensor) -> Tensor:
        """The sender's scores ``[B, V]`` for target features ``[B, F]``."""
        scores: Tensor = self.sender(target_features)
        return scores

    def game_loss(self, candidate_embeddings: Tensor, target: Tensor, kind: GameLossKind = "nll") -> GameLoss:
        """The estimator's loss for one batch (see :class:`GameLoss`); ``candidate_embeddings [B, C, E]`` come from
        :meth:`Receiver.embed_candidates` (once per batch), ``target [B]`` holds the target positions."""
        return GameLoss(self.receiver, candidate_embeddings, target, kind)

    def greedy_success(self, scores: Tensor, game_loss: GameLoss) -> Tensor:
        """Float ``[B]``: 1 where the receiver's argmax, given the sender's argmax symbol of ``scores [B, V]``,
        is the target of ``game_loss``'s games."""
        index = torch.arange(scores.shape[0], device=scores.device)
        guess = game_loss.category_log_probs(scores.argmax(-1), index).argmax(-1)
        return (guess == game_loss.target).to(scores.dtype)
