"""Information Compression Module (Retrv-R1, arXiv 2510.02745).

Each candidate's full token sequence ``T_c`` (vision-tower tokens and text token
embeddings, in the LM's embedding space) becomes two tokens:

* content token ``t_con = ATT_1(Q=e_con, K=T_c, V=T_c)``;
* relation token ``R = ATT_2(Q=T_c, K=T_q, V=T_q)`` then ``t_rel = ATT_1'(Q=e_con', K=R, V=R)``,
  where ``ATT_1'``/``e_con'`` are ``ATT_1``/``e_con`` when ``share_compressor`` is true.

The paper calls each ATT "two-layer attention" without giving heads, norms or MLPs; here
each is ``num_layers`` pre-norm cross-attention blocks with an MLP, run at an inner width
``dim`` (projected from and back to the LM hidden size) so that the module stays small on
large backbones. The output is layer-normed and scaled to the RMS of the LM's input
embeddings, so compressed tokens enter the LM at the scale it expects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class ICMConfig:
    """Shape of the ICM. ``hidden_size`` is the LM's; the rest are ours (the paper does not give them)."""

    hidden_size: int
    dim: int | None = None
    num_heads: int = 8
    num_layers: int = 2
    mlp_ratio: float = 2.0
    share_compressor: bool = True
    dropout: float = 0.0
    output_scale: float = 1.0

    @property
    def inner_dim(self) -> int:
        return self.dim or min(self.hidden_size, 512)

    def to_dict(self) -> dict:
        return asdict(self)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention with a residual, followed by a residual MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        kv_n = self.norm_kv(kv)
        pad = None if kv_mask is None else ~kv_mask
        attended, _ = self.attn(self.norm_q(q), kv_n, kv_n, key_padding_mask=pad, need_weights=False)
        x = q + attended
        return x + self.mlp(self.norm_mlp(x))


class AttentionStack(nn.Module):
    """``num_layers`` cross-attention blocks: one "ATT" of the paper."""

    def __init__(self, cfg: ICMConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.num_layers)
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            q = block(q, kv, kv_mask)
        return q


class InformationCompressionModule(nn.Module):
    """Compresses candidates to ``(t_con, t_rel)`` pairs in the LM's embedding space."""

    def __init__(self, cfg: ICMConfig) -> None:
        super().__init__()
        if cfg.inner_dim % cfg.num_heads:
            raise ValueError(f"ICM dim {cfg.inner_dim} is not divisible by num_heads {cfg.num_heads}")
        self.config = cfg
        d = cfg.inner_dim
        self.in_proj = nn.Linear(cfg.hidden_size, d)
        self.content_query = nn.Parameter(torch.randn(1, 1, d) * 0.02)  # e_con
        self.compress = AttentionStack(cfg)  # ATT_1
        self.relate = AttentionStack(cfg)  # ATT_2: candidate tokens attend to the query
        if cfg.share_compressor:
            self.relation_query = self.content_query
            self.compress_relation = self.compress
        else:
            self.relation_query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.compress_relation = AttentionStack(cfg)
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, cfg.hidden_size)
        # RMS of the LM's input embeddings; set by the model wrapper, saved with the weights.
        self.register_buffer("output_scale", torch.tensor(float(cfg.output_scale)))

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.in_proj(tokens.to(self.in_proj.weight.dtype))

    def _emit(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out_proj(self.out_norm(x.squeeze(1)))
        # Normalise to unit RMS, then scale to the LM's embedding RMS.
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y * self.output_scale

    def content(self, cand: torch.Tensor, cand_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``t_con`` for a batch of candidates ``(B, L, H)`` -> ``(B, H)``."""
        c = self._project(cand)
        q = self.content_query.expand(c.shape[0], -1, -1)
        return self._emit(self.compress(q, c, cand_mask))

    def relation(
        self,
        cand: torch.Tensor,
        query: torch.Tensor,
        cand_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``t_rel`` for candidates ``(B, L, H)`` against query tokens ``(B or 1, Lq, H)`` -> ``(B, H)``."""
        c = self._project(cand)
        qt = self._project(query)
        if qt.shape[0] == 1 and c.shape[0] > 1:
            qt = qt.expand(c.shape[0], -1, -1)
            if query_mask is not None:
                query_mask = query_mask.expand(c.shape[0], -1)
        related = self.relate(c, qt, query_mask)  # R: one row per candidate token
        q = self.relation_query.expand(c.shape[0], -1, -1)
        return self._emit(self.compress_relation(q, related, cand_mask))

    def forward(
        self,
        cand: torch.Tensor,
        query: torch.Tensor,
        cand_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.content(cand, cand_mask), self.relation(cand, query, cand_mask, query_mask)
