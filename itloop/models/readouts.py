"""Readouts: maps from backbone features to site responses.

``FactorizedReadout`` is the factorized linear readout of Klindt et al. (2017) used by Guo et al.:
per site n a spatial mask w_s[n] (h × w) and channel weights w_c[n] (C),

    r[b, n] = Σ_c Σ_hw feats[b, c, h, w] · w_s[n, h, w] · w_c[n, c] + bias[n].
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["FactorizedReadout", "Readout", "ReadoutInit"]

ReadoutInit = Literal["normal", "scaled"]


class Readout(nn.Module):
    """(B, C, h, w) features -> (B, N) site responses, for features of one fixed shape.

    Subclasses own a per-site ``bias`` (N,) parameter, in response units.
    """

    in_shape: tuple[int, int, int]
    n_sites: int
    bias: nn.Parameter

    def __init__(self, in_shape: tuple[int, int, int], n_sites: int) -> None:
        super().__init__()
        if len(in_shape) != 3 or any(int(s) < 1 for s in in_shape):
            raise ValueError(f"in_shape must be (C, h, w) of positive sizes, got {in_shape}")
        if int(n_sites) < 1:
            raise ValueError(f"n_sites must be at least 1, got {n_sites}")
        c, h, w = (int(s) for s in in_shape)
        self.in_shape = (c, h, w)
        self.n_sites = int(n_sites)

    def check_features(self, feats: Tensor) -> None:
        """ValueError naming the shape unless ``feats`` is (B, *in_shape)."""
        if feats.ndim != 4 or tuple(feats.shape[1:]) != self.in_shape:
            raise ValueError(f"expected features (B, *{self.in_shape}), got {tuple(feats.shape)}")

    def regularizer(self) -> Tensor:
        """A scalar penalty on the readout's weights added to the fitting loss (zero here)."""
        ref = next(self.parameters())
        return ref.new_zeros(())

    def card(self) -> dict[str, Any]:
        """Class, in_shape and n_sites: enough to rebuild an empty readout of this kind."""
        return {
            "kind": type(self).__name__,
            "in_shape": list(self.in_shape),
            "n_sites": self.n_sites,
        }


class FactorizedReadout(Readout):
    """Spatial mask × channel weights + bias per site: (B, C, h, w) -> (B, N).

    init: ``"normal"`` is the paper's day-0 model, w_s, w_c ~ N(0, 1), bias 0; ``"scaled"``
    draws w_s ~ N(0, 1/(h·w)) and w_c ~ N(0, 1/C), so responses start at the scale of the
    features, which is what fitting wants. ``generator`` makes the draw reproducible.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        n_sites: int,
        init: ReadoutInit = "normal",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(in_shape, n_sites)
        if init not in ("normal", "scaled"):
            raise ValueError(f"init must be 'normal' or 'scaled', got {init!r}")
        c, h, w = self.in_shape
        self.init = init
        self.spatial = nn.Parameter(torch.empty(self.n_sites, h, w))
        self.features = nn.Parameter(torch.empty(self.n_sites, c))
        self.bias = nn.Parameter(torch.zeros(self.n_sites))
        s_std, c_std = (1.0, 1.0) if init == "normal" else ((h * w) ** -0.5, c**-0.5)
        with torch.no_grad():
            nn.init.normal_(self.spatial, std=s_std, generator=generator)
            nn.init.normal_(self.features, std=c_std, generator=generator)

    def forward(self, feats: Tensor) -> Tensor:
        """(B, C, h, w) features -> (B, N) site responses.

        Channels first, (B, hw, C) @ (C, N) -> (B, hw, N), then the masks: the intermediate is
        B·hw·N, never B·C·N.
        """
        self.check_features(feats)
        per_position = torch.matmul(feats.flatten(2).transpose(1, 2), self.features.t())
        masks = self.spatial.flatten(1).t()
        return (per_position * masks).sum(dim=1) + self.bias

    def weights(self) -> Tensor:
        """(N, C, h, w) full linear weights w_c[n, c] · w_s[n, h, w]; unlike the factors, unique."""
        return self.features[:, :, None, None] * self.spatial[:, None, :, :]

    def regularizer(self) -> Tensor:
        """Mean over sites of the L1 norm of the full weights, |w_s[n]|₁ · |w_c[n]|₁.

        A product of the factors' norms, so it does not change when w_s is scaled up and w_c down.
        """
        return (self.spatial.abs().flatten(1).sum(1) * self.features.abs().sum(1)).mean()

    def card(self) -> dict[str, Any]:
        return {**super().card(), "init": self.init}
