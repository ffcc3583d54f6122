"""Margin-based softmax heads for face-recognition training: CosFace, ArcFace, AdaFace.

Every head holds one weight row per identity and maps (embeddings (B, D) raw, labels (B,))
to logits (B, C) for a plain cross-entropy. Cosines are computed in float32 with autocast
off, because arccos and the scale s=64 are not safe in half precision.

- CosFace (Wang et al. 2018): target logit s * (cos(theta) - m), others s * cos(theta).
- ArcFace (Deng et al. 2019): target logit s * cos(theta + m). Where theta + m > pi the
  angle-margin logit is no longer monotone in theta, so (as insightface's original
  implementation does) it falls back to s * (cos(theta) - m * sin(m)).
- AdaFace (Kim et al. 2022, official code github.com/mk-minchul/AdaFace head.py): the
  margin adapts to the image-quality proxy ||z|| (feature norm). With batch statistics
  mu, sigma of the norms kept as an EMA (t_alpha), z_hat = clip(h * (||z|| - mu) /
  (sigma + eps), -1, 1); target angle theta + g_angle with g_angle = -m * z_hat, then
  target cosine minus g_add = m + m * z_hat; everything times s. Reproduced faithfully:
  cosines clamped to [-1 + 1e-3, 1 - 1e-3], norms clipped to [1e-3, 100] and detached,
  the EMA updated before the margin is computed (unbiased batch std, initial mu = 20,
  sigma = 100), angles clipped to [1e-3, pi - 1e-3]. One deliberate difference: the EMA
  is updated only in training mode, so evaluating logits has no side effect.

Weight init follows insightface's Partial FC, normal(0, 0.01) per row; only the directions
matter since rows are L2-normalised in every forward.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

COSINE_EPS = 1e-3  # AdaFace's eps for the cosine clamp, angle clip and sigma


class MarginHead(nn.Module, metaclass=abc.ABCMeta):
    """Base head: L2-normalised class weights; subclasses turn cosines into logits."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float, margin: float):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a margin head needs at least one class, got {num_classes}")
        self.scale = scale
        self.margin = margin
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos(theta_ij) = <z_i/||z_i||, w_j/||w_j||>: (B, D) -> (B, C) float32."""
        unit_embeddings = F.normalize(embeddings.float(), dim=1)
        unit_weights = F.normalize(self.weight.float(), dim=1)
        return unit_embeddings @ unit_weights.t()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) raw embeddings, (B,) int64 labels -> (B, C) float32 logits."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.logits(embeddings.float(), labels)

    @abc.abstractmethod
    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 embeddings, (B,) labels -> (B, C) margin-adjusted, scaled logits."""


def target_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) labels -> (B, C) bool, True at [i, labels[i]]."""
    return F.one_hot(labels, num_classes).bool()


class CosFaceHead(MarginHead):
    """CosFace / large-margin cosine loss: s * (cos(theta_y) - m) on the target class."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin=0.4):
        super().__init__(embedding_size, num_classes, scale, margin)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.cosines(embeddings)
        is_target = target_mask(labels, cosine.shape[1])
        return self.scale * torch.where(is_target, cosine - self.margin, cosine)


class ArcFaceHead(MarginHead):
    """ArcFace / additive angular margin: s * cos(theta_y + m) on the target class."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin=0.5):
        super().__init__(embedding_size, num_classes, scale, margin)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.cosines(embeddings)
        is_target = target_mask(labels, cosine.shape[1])
        # clamp keeps acos's gradient finite at |cos| = 1
        theta = torch.acos(cosine.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        with_margin = torch.cos(theta + self.margin)
        # theta + m > pi  <=>  cos(theta) < cos(pi - m): keep the logit decreasing in theta
        fallback = cosine - self.margin * math.sin(self.margin)
        target = torch.where(cosine > math.cos(math.pi - self.margin), with_margin, fallback)
        return self.scale * torch.where(is_target, target, cosine)


class AdaFaceHead(MarginHead):
    """AdaFace: quality-adaptive margin from feature-norm batch statistics (see module doc)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
    ):
        super().__init__(embedding_size, num_classes, scale, margin)
        self.h = h
        self.t_alpha = t_alpha
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def margin_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """z_hat = clip(h * (||z|| - mu) / (sigma + eps), -1, 1), after the EMA update: (B, 1)."""
        safe_norms = norms.clamp(min=0.001, max=100.0).detach()
        if self.training:
            with torch.no_grad():
                alpha = self.t_alpha
                self.batch_mean.mul_(1 - alpha).add_(alpha * safe_norms.mean())
                self.batch_std.mul_(1 - alpha).add_(alpha * safe_norms.std())
        scaler = (safe_norms - self.batch_mean) / (self.batch_std + COSINE_EPS)
        return (scaler * self.h).clamp(-1.0, 1.0)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        norms = embeddings.norm(dim=1, keepdim=True)  # (B, 1) image-quality proxy
        cosine = self.cosines(embeddings).clamp(-1 + COSINE_EPS, 1 - COSINE_EPS)
        scaler = self.margin_scaler(norms)
        is_target = target_mask(labels, cosine.shape[1])
        angle_margin = torch.where(is_target, -self.margin * scaler, 0.0)  # g_angle
        theta = torch.acos(cosine)
        cosine = torch.cos((theta + angle_margin).clamp(COSINE_EPS, math.pi - COSINE_EPS))
        additive_margin = torch.where(is_target, self.margin + self.margin * scaler, 0.0)  # g_add
        return self.scale * (cosine - additive_margin)


MARGIN_HEADS: dict[str, Callable[..., MarginHead]] = {
    "adaface": AdaFaceHead,
    "arcface": ArcFaceHead,
    "cosface": CosFaceHead,
}


def build_margin_head(name: str, embedding_size: int, num_classes: int, **kwargs) -> MarginHead:
    """Factory: MARGIN_HEADS[name](embedding_size, num_classes, **kwargs) with paper defaults."""
    if name not in MARGIN_HEADS:
        raise ValueError(f"unknown margin head {name!r}; options: {sorted(MARGIN_HEADS)}")
    return MARGIN_HEADS[name](embedding_size, num_classes, **kwargs)
