"""The factorised layer that replaces a dense Linear (or GPT-2 Conv1D)."""

from __future__ import annotations

import torch
from torch import nn

SOURCE_KINDS = ("linear", "conv1d")


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: two plain Linears, ``down`` (in -> rank, no bias) and ``up`` (rank -> out, bias).

    Being two ordinary ``nn.Linear`` modules, it trains, exports to ONNX (two MatMuls) and quantises
    like any other layer. ``source_kind`` records what it replaced, so a saved model can be rebuilt.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        source_kind: str = "linear",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if source_kind not in SOURCE_KINDS:
            raise ValueError(f"source_kind={source_kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.source_kind = source_kind
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: torch.Tensor | None,
        source_kind: str = "linear",
    ) -> LowRankLinear:
        """Build from ``up`` ``(out, r)``, ``down`` ``(r, in)`` and the original bias."""
        out_features, rank = up.shape
        _, in_features = down.shape
        layer = cls(in_features, out_features, rank, bias=bias is not None, source_kind=source_kind,
                    dtype=up.dtype, device=up.device)
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"source_kind={self.source_kind}")
