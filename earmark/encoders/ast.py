"""Audio Spectrogram Transformer (AST) baseline over the same log-mel patch tokens as the Mamba encoder.

Patching, frequency-major token order, the position-embedding grid (sliced / interpolated along time),
the class token in the middle (index ``n // 2``) and the pooling are inherited from
:class:`~earmark.encoders.mamba.MambaEncoder`, so the two encoders differ only in their blocks:
pre-norm transformer blocks (LayerNorm, full bidirectional multi-head self-attention through
``scaled_dot_product_attention``, MLP ratio 4 with GELU) instead of Mamba blocks. Attention costs
O(n^2) in the number of tokens, the point of the comparison in ``benchmarks/encoders.py``.

Heads = ``embed_dim // 64`` (at least 1) and the MLP ratio is fixed at 4, both derived rather than
configured so EncoderConfig stays shared; the SSM fields of the config are ignored.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from earmark.encoders.config import ENCODERS, EncoderConfig
from earmark.encoders.mamba import MambaEncoder

__all__ = ["ASTEncoder", "Attention", "TransformerBlock", "MLP_RATIO", "num_heads"]

MLP_RATIO = 4


def num_heads(embed_dim: int) -> int:
    """64-dim heads, as in ViT/DeiT/AST; at least one head for narrow test models."""
    return max(1, embed_dim // 64)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask: every token sees the whole clip).

    ``explicit``: softmax(Q K^T / sqrt(d)) V with the (n x n) attention matrix materialised, as
    SSAST (timm's ViT) computes it - the memory baseline; otherwise PyTorch's
    ``scaled_dot_product_attention``, which never holds the whole matrix. Same function, same weights.
    """

    def __init__(self, dim: int, heads: int, explicit: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim ({dim}) must be a multiple of the number of heads ({heads})")
        self.heads = heads
        self.explicit = explicit
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, n, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.explicit:
            attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            y = attn.softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h + attn(norm1(h)), then h + mlp(norm2(h))."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        d = config.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, num_heads(d), explicit=config.attention == "explicit")
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, MLP_RATIO * d), nn.GELU(), nn.Linear(MLP_RATIO * d, d))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


@ENCODERS.register("ast")
class ASTEncoder(MambaEncoder):
    """(batch, n_mels, frames) log-mel -> (batch, embed_dim) clip embedding with transformer blocks.

    Subclasses MambaEncoder for ``token_grid``, ``cls_index``, the position handling, ``forward_tokens``
    (which runs ``self.layers`` then ``self.norm_f``), ``forward`` and ``no_weight_decay_params``.
    Only the blocks (``make_block``) and the final norm (``make_norm``) differ.
    """

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__(config or EncoderConfig(arch="ast"))
        for m in self.layers.modules():  # ViT/DeiT init: truncated normal weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)

    @staticmethod
    def make_block(config: EncoderConfig) -> nn.Module:
        return TransformerBlock(config)

    @staticmethod
    def make_norm(dim: int) -> nn.Module:
        return nn.LayerNorm(dim, eps=1e-6)
