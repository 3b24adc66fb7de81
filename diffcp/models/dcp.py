"""Deep Closest Point (Wang & Solomon, ICCV 2019): DCP-v1 and DCP-v2 with an SVD head.

``DCP`` embeds both clouds per point (DGCNN or PointNet, 512 channels), lets a "pointer" mix the
two embeddings, matches every source point softly to the target by a softmax over scaled
embedding products, and solves the rigid motion by weighted Procrustes:

- **v1**: the pointer is the identity. In the authors' code it *returns its input* and the caller
  adds the pointer's output to the embeddings, so v1's embeddings are doubled (``2 phi``), and the
  softmax sees 4x the plain products. The released ``dcp_v1.t7`` was trained so; this module does
  the same (``pointer="identity"``), and ``load_dcp`` gives the authors' numbers only with it.
- **v2**: the pointer is one transformer block (encoder + decoder, 4 heads, feed-forward 1024,
  no dropout, LayerNorm with the unbiased standard deviation and eps 1e-6, pre-norm residuals as
  in the "Annotated Transformer"); target's pointer output = decoder(target | encoder(source)),
  source's = decoder(source | encoder(target)); the outputs are added to the embeddings.
- **SVD head**: ``p_ij = softmax_j(<e_i, f_j> / sqrt(512))``, the source point ``x_i`` is matched
  to ``sum_j p_ij y_j``; the rotation and translation come from :func:`diffcp.procrustes` (the
  same polar factor and determinant fix as the authors' per-item SVD with ``head.reflect``, batched,
  with a backward that stays finite on symmetric shapes). ``head.reflect`` is kept as a buffer-like
  parameter so that the released checkpoint loads with ``strict=True``; it is not used.

Module names follow the authors' release (``emb_nn``, ``pointer.model.encoder.layers.0...``,
``head.reflect``). Inputs and outputs follow diffcp's convention: clouds ``(B, N, 3)``, result
``target ~ R source + t``. Call ``.eval()`` before evaluating (BatchNorm running statistics);
:func:`load_dcp` returns an evaluating model.
"""

from __future__ import annotations

import copy
import math
import os
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from diffcp.minimize.procrustes import procrustes
from diffcp.models.checkpoints import read_state_dict, weights_path
from diffcp.models.dgcnn import DGCNN
from diffcp.models.pointnet import PointNet

__all__ = ["DCP", "DCPOutput", "load_dcp", "Transformer", "SVDHead"]


class DCPOutput(NamedTuple):
    """``target ~ rotation @ source + translation``."""

    rotation: Tensor  # (B, 3, 3)
    translation: Tensor  # (B, 3)


class LayerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm: ``a (x - mean) / (std + eps) + b``, unbiased std."""

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.a_2, self.b_2, self.eps = nn.Parameter(torch.ones(features)), nn.Parameter(torch.zeros(features)), eps

    def forward(self, x: Tensor) -> Tensor:
        return self.a_2 * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) + self.b_2


class MultiHeadAttention(nn.Module):
    """``linears[0..2]`` project query, key, value into ``heads`` heads; ``linears[3]`` mixes them."""

    def __init__(self, heads: int, dims: int):
        super().__init__()
        if dims % heads:
            raise ValueError(f"dims must be divisible by heads; got {dims} and {heads}.")
        self.heads = heads
        self.linears = nn.ModuleList([nn.Linear(dims, dims) for _ in range(4)])

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        B, h = query.shape[0], self.heads
        q, k, v = (lin(x).view(B, -1, h, x.shape[-1] // h).transpose(1, 2) for lin, x in zip(self.linears, (query, key, value)))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.linears[3]((attn @ v).transpose(1, 2).reshape(B, -1, h * q.shape[-1]))


class FeedForward(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(dims, hidden), nn.Linear(hidden, dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class Sublayer(nn.Module):
    """Pre-norm residual: ``x + f(norm(x))`` (no dropout)."""

    def __init__(self, dims: int):
        super().__init__()
        self.norm = LayerNorm(dims)

    def forward(self, x: Tensor, f) -> Tensor:
        return x + f(self.norm(x))


class EncoderLayer(nn.Module):
    def __init__(self, dims: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn, self.feed_forward = MultiHeadAttention(heads, dims), FeedForward(dims, hidden)
        self.sublayer = nn.ModuleList([Sublayer(dims) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y))
        return self.sublayer[1](x, self.feed_forward)


class DecoderLayer(nn.Module):
    def __init__(self, dims: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn, self.src_attn = MultiHeadAttention(heads, dims), MultiHeadAttention(heads, dims)
        self.feed_forward = FeedForward(dims, hidden)
        self.sublayer = nn.ModuleList([Sublayer(dims) for _ in range(3)])

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y))
        x = self.sublayer[1](x, lambda y: self.src_attn(y, memory, memory))
        return self.sublayer[2](x, self.feed_forward)


class Stack(nn.Module):
    """``blocks`` copies of a layer and a final LayerNorm (the encoder or the decoder)."""

    def __init__(self, layer: nn.Module, blocks: int, dims: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(blocks)])
        self.norm = LayerNorm(dims)

    def forward(self, x: Tensor, *memory: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, *memory)
        return self.norm(x)


class EncoderDecoder(nn.Module):
    def __init__(self, dims: int, heads: int, hidden: int, blocks: int):
        super().__init__()
        self.encoder = Stack(EncoderLayer(dims, heads, hidden), blocks, dims)
        self.decoder = Stack(DecoderLayer(dims, heads, hidden), blocks, dims)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        return self.decoder(tgt, self.encoder(src))


class Transformer(nn.Module):
    """DCP-v2's pointer: embeddings ``(B, C, N), (B, C, M)`` -> their attention residuals."""

    def __init__(self, dims: int = 512, heads: int = 4, hidden: int = 1024, blocks: int = 1):
        super().__init__()
        self.model = EncoderDecoder(dims, heads, hidden, blocks)

    def forward(self, src: Tensor, tgt: Tensor) -> Tuple[Tensor, Tensor]:
        src, tgt = src.transpose(1, 2), tgt.transpose(1, 2)
        tgt_p = self.model(src, tgt).transpose(1, 2)
        src_p = self.model(tgt, src).transpose(1, 2)
        return src_p, tgt_p


class IdentityPointer(nn.Module):
    """DCP-v1's pointer: returns its inputs, which the caller then adds (embeddings doubled)."""

    def forward(self, src: Tensor, tgt: Tensor) -> Tuple[Tensor, Tensor]:
        return src, tgt


class SVDHead(nn.Module):
    """Soft matches by embedding products, then :func:`diffcp.procrustes`."""

    def __init__(self):
        super().__init__()
        self.reflect = nn.Parameter(torch.diag(torch.tensor([1.0, 1.0, -1.0])), requires_grad=False)

    def forward(self, src_emb: Tensor, tgt_emb: Tensor, source: Tensor, target: Tensor) -> DCPOutput:
        """Embeddings ``(B, C, N), (B, C, M)``, clouds ``(B, N, 3), (B, M, 3)``."""
        scores = torch.softmax(src_emb.transpose(1, 2) @ tgt_emb / math.sqrt(src_emb.shape[1]), dim=-1)
        matched = scores @ target  # (B, N, 3)
        R, t = procrustes(source, matched)
        return DCPOutput(R, t)


class DCP(nn.Module):
    """Deep Closest Point: ``DCP("dgcnn", "identity")`` is v1, ``DCP("dgcnn", "transformer")`` v2.

    Args:
        embedding: ``"dgcnn"`` (k = 20) or ``"pointnet"``.
        pointer: ``"identity"`` (v1) or ``"transformer"`` (v2).
        emb_dims, heads, ff_dims, blocks: the authors' defaults 512, 4, 1024, 1.

    ``forward(source (B, N, 3), target (B, M, 3)) -> DCPOutput(rotation (B, 3, 3), translation (B, 3))``.

    Example:
        >>> net = DCP("pointnet", "transformer", emb_dims=32, ff_dims=16).eval()
        >>> out = net(torch.randn(2, 40, 3), torch.randn(2, 50, 3))
        >>> tuple(out.rotation.shape), tuple(out.translation.shape)
        ((2, 3, 3), (2, 3))
    """

    def __init__(self, embedding: str = "dgcnn", pointer: str = "identity", emb_dims: int = 512, heads: int = 4,
                 ff_dims: int = 1024, blocks: int = 1):
        super().__init__()
        if embedding not in ("dgcnn", "pointnet"):
            raise ValueError(f"embedding must be 'dgcnn' or 'pointnet'; got {embedding!r}.")
        if pointer not in ("identity", "transformer"):
            raise ValueError(f"pointer must be 'identity' or 'transformer'; got {pointer!r}.")
        self.emb_nn = DGCNN(emb_dims) if embedding == "dgcnn" else PointNet(emb_dims)
        self.pointer = IdentityPointer() if pointer == "identity" else Transformer(emb_dims, heads, ff_dims, blocks)
        self.head = SVDHead()

    def embeddings(self, source: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
        """The embeddings the head compares, ``(B, C, N), (B, C, M)`` (``phi + pointer(phi)``)."""
        for name, x in (("source", source), ("target", target)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != 3:
                raise ValueError(f"{name} must be a tensor of shape (B, N, 3); got {getattr(x, 'shape', type(x))}.")
        src_emb, tgt_emb = self.emb_nn(source.transpose(1, 2)), self.emb_nn(target.transpose(1, 2))
        src_p, tgt_p = self.pointer(src_emb, tgt_emb)
        return src_emb + src_p, tgt_emb + tgt_p

    def forward(self, source: Tensor, target: Tensor) -> DCPOutput:
        src_emb, tgt_emb = self.embeddings(source, target)
        return self.head(src_emb, tgt_emb, source, target)


def load_dcp(variant: str = "v1", path: Optional[Union[str, os.PathLike]] = None) -> DCP:
    """A released DCP checkpoint in an evaluating model (``strict=True``).

    Args:
        variant: ``"v1"`` (DGCNN + identity pointer; ``dcp_v1.t7``) or ``"v2"`` (DGCNN +
            transformer; ``dcp_v2.t7``, not released with this project: train it).
        path: the checkpoint; None for ``weights_folder() / "dcp_<variant>.t7"``.
    """
    if variant not in ("v1", "v2"):
        raise ValueError(f"variant must be 'v1' or 'v2'; got {variant!r}.")
    model = DCP("dgcnn", "identity" if variant == "v1" else "transformer")
    model.load_state_dict(read_state_dict(weights_path(f"dcp_{variant}.t7", path)), strict=True)
    return model.eval()
