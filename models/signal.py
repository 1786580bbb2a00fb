"""Sender and receiver of the referential signalling game (Lazaridou et al. 2017, as in the paper's code).

Shapes: ``B`` games, ``C`` candidates, ``F`` feature width, ``E`` embedding size, ``H`` hidden size, ``V``
vocabulary size, ``R`` loss rows (one message each).

Sender (sees the target only): ``e = W1 x`` (``F -> E``, no bias); then the "informed sender" stack of the code
(a 1x1 convolution with ``H`` filters, sigmoid, an ``(H, 1)`` convolution back to one channel, sigmoid). For a
single image that stack acts on each of the ``E`` embedding coordinates separately with the same weights, so it
is exactly a shared per-coordinate network ``g(e_j) = sigmoid(sum_k v_k sigmoid(w_k e_j))`` with ``H`` hidden
units and no biases, implemented here as such (``[B, E, H]`` intermediates); then ``scores = W4 g(e) / tau_s``
(``E -> V``, no bias, sender temperature ``tau_s``). The code applies a log-softmax afterwards; it is omitted
because every estimator normalizes the scores itself and softmax/sparsemax are shift-invariant.

Receiver: ``u_c = W x_c`` for every candidate (``F -> E``, no bias, computed once per batch) and a symbol
embedding ``M [V, E]`` (``N(0, 1)`` initialised like the code's ``nn.Embedding``); a message row ``z [V]``
(one-hot or relaxed) is embedded as ``z @ M`` and scores candidate ``c`` by ``<u_c, z @ M>``; log-softmax over
the ``C`` candidates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvzoo.estimators.base import LossFn


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
        hidden = torch.sigmoid(embedded.unsqueeze(-1) * self.hidden_weight)  # [B, E, H]
        mixed = torch.sigmoid(hidden @ self.mix_weight)  # [B, E]
        scores: Tensor = self.vocab_projection(mixed) / self.temperature
        return scores


class Receiver(nn.Module):
    """Embeds candidates once per batch, then scores candidates against message rows."""

    def __init__(self, feature_dim: int, vocab_size: int, embedding_size: int) -> None:
        super().__init__()
        self.image_embedding = nn.Linear(feature_dim, embedding_size, bias=False)
        self.symbol_embedding = nn.Embedding(vocab_size, embedding_size)

    def embed_candidates(self, candidates: Tensor) -> Tensor:
        """Candidate features ``[B, C, F]`` -> embeddings ``[B, C, E]``."""
        embedded: Tensor = self.image_embedding(candidates)
        return embedded

    def candidate_log_probs(self, candidate_embeddings: Tensor, z_rows: Tensor, example_index: Tensor) -> Tensor:
        """``log p(c | candidates of example_index[r], z_rows[r])``, ``[R, C]``.

        ``candidate_embeddings [B, C, E]``, ``z_rows [R, V]`` (one-hot or relaxed), ``example_index [R]``: each
        row only looks up its own example's ``C`` candidate embeddings.
        """
        message = z_rows.to(self.symbol_embedding.weight.dtype) @ self.symbol_embedding.weight  # [R, E]
        rows_candidates = candidate_embeddings.index_select(0, example_index)  # [R, C, E]
        logits = torch.bmm(rows_candidates, message.unsqueeze(-1)).squeeze(-1)  # [R, C]
        return F.log_softmax(logits, dim=-1)


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

    def game_loss(self, candidate_embeddings: Tensor, target: Tensor) -> LossFn:
        """The estimator's loss ``(z_rows [R, V], example_index [R]) -> -log p(target | candidates, z) [R]``.

        ``candidate_embeddings [B, C, E]`` come from :meth:`Receiver.embed_candidates` (once per batch);
        ``target [B]`` holds the target positions.
        """

        def loss_fn(z_rows: Tensor, example_index: Tensor) -> Tensor:
            log_probs = self.receiver.candidate_log_probs(candidate_embeddings, z_rows, example_index)
            return -log_probs.gather(1, target.index_select(0, example_index).unsqueeze(1)).squeeze(1)

        return loss_fn

    def greedy_success(self, scores: Tensor, candidate_embeddings: Tensor, target: Tensor) -> Tensor:
        """Float ``[B]``: 1 where the receiver's argmax, given the sender's argmax symbol, is the target."""
        batch = scores.shape[0]
        symbols = torch.eye(self.vocab_size, dtype=candidate_embeddings.dtype, device=scores.device)
        message = symbols[scores.argmax(-1)]  # [B, V] one-hot (indexing, unlike F.one_hot, needs no host sync)
        index = torch.arange(batch, device=scores.device)
        guess = self.receiver.candidate_log_probs(candidate_embeddings, message, index).argmax(-1)
        return (guess == target).to(candidate_embeddings.dtype)
