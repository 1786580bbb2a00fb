"""The signalling game's receiver as it was before the lean formulation: every loss row copies its example's
candidate embeddings (``[R, C, E]``) and scores them with a batched product. The lean receiver is tested and
benchmarked against it."""

from __future__ import annotations

import torch
from torch import Tensor

from lvzoo.models.signal import GameLoss


class PerRowCopyLoss(GameLoss):
    """``-log p(target | candidates, z)`` rows computed with per-row candidate copies (NLL only)."""

    def __call__(self, z_rows: Tensor, example_index: Tensor) -> Tensor:
        embedded = self.candidate_embeddings.index_select(0, example_index)  # [R, C, E]
        message = z_rows.to(embedded.dtype) @ self.receiver.symbol_embedding.weight.to(embedded.dtype)  # [R, E]
        log_probs = torch.log_softmax(torch.bmm(embedded, message.unsqueeze(-1)).squeeze(-1), dim=-1)
        return -log_probs.gather(1, self.target.index_select(0, example_index).unsqueeze(1)).squeeze(1)

    def of_categories(self, categories: Tensor, example_index: Tensor) -> Tensor:
        """The same per-row copies for one-hot rows (no gathering from all symbol logits)."""
        eye = torch.eye(self.receiver.symbol_embedding.num_embeddings, dtype=self.candidate_embeddings.dtype)
        return self(eye.to(categories.device)[categories], example_index)
