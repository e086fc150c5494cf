"""GE/FD diversity enhancement **[our design]** (Chen et al., IEEE TMM 2025; only the abstract is public).

A component, not a method: CPRFL and TRM-ML insert it over their C category tokens (``model.diversity``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from cimlic.errors import ConfigError


@dataclass
class DiversityConfig:
    enabled: bool = False  # GE/FD diversity enhancement over the C category tokens (CPRFL, TRM-ML) [our design]
    heads: int = 4  # attention heads of the cross-category self-attention (must divide the token width)
    dropout: float = 0.1  # dropout on the attention output before the residual connection

    RANGES = {"heads": ">=1", "dropout": "[0, 1)"}


class DiversityModule(nn.Module):
    """The C category-specific features pass through one self-attention layer *across categories*.

    x' = x + Dropout(MHA(LN(x), LN(x), LN(x))), with a residual connection, so that tail-class features borrow
    information from all categories. The output projection starts at zero, so a freshly added module is the
    identity and switching it on does not disturb the model it is inserted into.

    Args:
        dim: token width D.
        heads: attention heads (must divide ``dim``).
        dropout: dropout on the attention output before the residual.
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.diversity.heads ({heads}) must divide the token width ({dim})")
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D) category features -> (B, C, D)."""
        h = self.norm(x)
        mixed, _ = self.attn(h, h, h, need_weights=False)  # (B, C, D): every category attends to all
        return x + self.dropout(mixed)


def build_diversity(cfg: DiversityConfig, dim: int) -> nn.Module:
    """``DiversityModule`` when ``cfg.enabled``, else the identity (the ablation switch)."""
    return DiversityModule(dim, cfg.heads, cfg.dropout) if cfg.enabled else nn.Identity()
