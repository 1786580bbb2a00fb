"""Kingma et al. (2014) M2 semi-supervised VAE, as set up by Correia et al. (2020, section 3.1 of PAPER_SETUP.md).

Generative model ``p(z) p(h) p(x | z, h)``: ``z`` a class (uniform prior over ``K``), ``h`` an ``latent_dim``-d
standard Gaussian, ``x`` 784 Bernoulli pixels. Inference: a classifier ``pi(z | x)`` and a Gaussian
``q(h | x, z)`` with a reparameterised sample.

Shapes: ``B`` images, ``R`` (image, class) rows, ``P = 784`` pixels, ``K`` classes, ``L = latent_dim``.

- Classifier ``pi(z | x)``: ``P -> 256 -> 256 -> 256 -> K`` with ReLU (paper: 3 hidden layers of 256).
- Encoder ``q(h | x, z)``: ``[x; z] -> 128 -> 128 -> (mu, logvar)``.
- Decoder ``p(x | z, h)``: ``[h; z] -> 128 -> 128 -> P`` Bernoulli logits.

The paper text says the generative and inference networks have *one* hidden layer of 128; the official code
uses two (fc1, fc2, fc3). ``vae_layers=2`` follows the code; ``vae_layers=1`` gives the paper text's networks.
``z`` enters as a row of width ``K``: one-hot for exact or sampled classes, a point of the simplex for relaxed
(Gumbel-softmax) samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Pixels of a flattened 28x28 image.
IMAGE_PIXELS = 784


def mlp(in_dim: int, hidden: int, layers: int, out_dim: int) -> nn.Sequential:
    """``in_dim -> hidden (x layers, ReLU) -> out_dim``."""
    modules: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    modules.append(nn.Linear(width, out_dim))
    return nn.Sequential(*modules)


class SSVAEModel(nn.Module):
    """Classifier ``pi(z|x)``, Gaussian encoder ``q(h|x,z)`` and Bernoulli decoder ``p(x|z,h)``."""

    def __init__(
        self,
        num_classes: int = 10,
        latent_dim: int = 8,
        classifier_hidden: int = 256,
        classifier_layers: int = 3,
        vae_hidden: int = 128,
        vae_layers: int = 2,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.classifier = mlp(IMAGE_PIXELS, classifier_hidden, classifier_layers, num_classes)
        self.encoder = mlp(IMAGE_PIXELS + num_classes, vae_hidden, vae_layers, 2 * latent_dim)
        self.decoder = mlp(latent_dim + num_classes, vae_hidden, vae_layers, IMAGE_PIXELS)

    def classify(self, x: Tensor) -> Tensor:
        """Classifier scores ``[B, K]`` of binary images ``x [B, P]``."""
        scores: Tensor = self.classifier(x)
        return scores

    def encode(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each ``[R, L]``, of ``q(h | x, z)`` for ``x [R, P]`` and class rows ``z [R, K]``."""
        mu, logvar = self.encoder(torch.cat([x, z], dim=-1)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, h: Tensor, z: Tensor) -> Tensor:
        """Bernoulli pixel logits ``[R, P]`` of ``p(x | z, h)`` for ``h [R, L]`` and ``z [R, K]``."""
        logits: Tensor = self.decoder(torch.cat([h, z], dim=-1))
        return logits

    def neg_elbo_given_class(
        self, x: Tensor, z: Tensor, *, sample_h: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """``-log p(x | z, h) + KL(q(h | x, z) || N(0, I))`` per row, ``[R]``, for ``x [R, P]``, ``z [R, K]``.

        ``h = mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` drawn from ``generator`` (reparameterised);
        ``sample_h=False`` uses ``h = mu`` (a deterministic evaluation, not an unbiased ELBO estimate).
        """
        mu, logvar = self.encode(x, z)
        if sample_h:
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            h = mu + torch.exp(0.5 * logvar) * eps
        else:
            h = mu
        logits = self.decode(h, z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
        return reconstruction + kl

    def log_num_classes(self) -> float:
        """``-log p(z) = log K`` under the uniform class prior."""
        return math.log(self.num_classes)
