"""The factorised layer that replaces a dense Linear (or GPT-2 Conv1D)."""

from __future__ import annotations

import torch
from torch import nn

SOURCE_KINDS = ("linear", "conv1d")


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: two plain Linears, ``down`` (in -> rank, no bias) and ``up`` (rank -> out, bias).

    Being two ordinary ``nn.Linear`` modules, it trains, exports to ONNX (two MatMuls) and quantises
    like any other layer. ``source_kind`` records what it replaced, so a saved model can be rebuilt.
    Layers that read the same input (an attention block's q, k and v) may share one ``down`` module:
    pass it as ``down`` and it is used, not copied, so training updates it once for all of them.
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
        down: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if source_kind not in SOURCE_KINDS:
            raise ValueError(f"source_kind={source_kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.source_kind = source_kind
        if down is not None and (down.in_features, down.out_features, down.bias) != (in_features, rank, None):
            raise ValueError(f"a shared down-projection must be Linear({in_features}, {rank}, bias=False)")
        self.down = down if down is not None else nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: torch.Tensor | None,
        source_kind: str = "linear",
        shared_down: nn.Linear | None = None,
    ) -> LowRankLinear:
        """Build from ``up`` ``(out, r)``, ``down`` ``(r, in)`` and the original bias.

        With ``shared_down`` the layer uses that module (already holding ``down``) instead of a new one.
        """
        out_features, rank = up.shape
        _, in_features = down.shape
        layer = cls(in_features, out_features, rank, bias=bias is not None, source_kind=source_kind,
                    dtype=up.dtype, device=up.device, down=shared_down)
        with torch.no_grad():
            if shared_down is None:
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
