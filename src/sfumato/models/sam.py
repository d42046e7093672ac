"""Segment Anything (SAM): the ViT image encoder, the prompt encoder and the two-way mask decoder.

Attribute paths equal the published checkpoints' keys (``sam_vit_b_01ec64.pth`` and its siblings:
``image_encoder.``, ``prompt_encoder.``, ``mask_decoder.``), so they load with ``strict=True``.

* Image encoder: a plain ViT on 16-px patches of a 1024² input with an absolute position embedding,
  windowed attention (14×14, the grid zero-padded to a multiple) in all blocks but the global ones,
  each attention adding decomposed relative-position terms (rel_pos_h / rel_pos_w, 2·size − 1 rows),
  then a neck (1×1 conv, LayerNorm2d, 3×3 conv, LayerNorm2d) to 256 channels at 64².
* Prompt encoder: points and box corners as random Fourier features of their position (+0.5, over
  the input size) plus a learned embedding per kind (negative, positive, corner 1, corner 2; padding
  points when there is no box); a mask prompt through two stride-2 convs, else ``no_mask_embed``.
* Mask decoder: output tokens (IoU token, 4 mask tokens) and the prompt tokens attend to the image
  embedding and back in a two-way transformer; the image embedding upscaled ×4 by transposed convs
  is weighted by a hypernetwork MLP per mask token; an MLP on the IoU token scores each mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SAMConfig:
    width: int = 768                      # image encoder
    depth: int = 12
    heads: int = 12
    global_blocks: tuple[int, ...] = (2, 5, 8, 11)
    image_size: int = 1024
    patch_size: int = 16
    window: int = 14
    mlp_ratio: float = 4.0
    prompt_dim: int = 256                 # prompt encoder and mask decoder
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp: int = 2048
    iou_hidden: int = 256
    multimask: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


SAM_PRESETS = {
    "vit_b": SAMConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SAMConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SAMConfig(1280, 32, 16, (7, 15, 23, 31)),
}


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - mean) / torch.sqrt(var + self.eps)) + self.bias[:, None, None]


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.lin1, self.lin2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


# -- image encoder --------------------------------------------------------------------------------

def _relative(rel: Tensor, q: int, k: int) -> Tensor:
    """[q, k, C] embeddings of the relative offsets between q query and k key positions, the table
    linearly resized when it was made for another size."""
    rows = 2 * max(q, k) - 1
    if rel.shape[0] != rows:
        rel = F.interpolate(rel.T[None], size=rows, mode="linear")[0].T
    qc = torch.arange(q)[:, None] * max(k / q, 1.0)
    kc = torch.arange(k)[None, :] * max(q / k, 1.0)
    return rel[((qc - kc) + (k - 1) * max(q / k, 1.0)).long()]


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, heads: int, size: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, h * w, -1).unbind(0)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        grid = q.reshape(b * self.heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid, _relative(self.rel_pos_h, h, h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid, _relative(self.rel_pos_w, w, w))
        attn = (attn.view(-1, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]).view(-1, h * w, h * w)
        out = (attn.softmax(dim=-1) @ v).view(b, self.heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: SAMConfig, window: int):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = EncoderAttention(cfg.width, cfg.heads, window or cfg.grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = MLPBlock(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        if self.window:
            y = self._windowed(y)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))

    def _windowed(self, x: Tensor) -> Tensor:
        """Attention within non-overlapping windows; the grid is zero-padded to a multiple first."""
        b, h, w, c = x.shape
        s = self.window
        ph, pw = -h % s, -w % s
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        windows = x.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
        out = self.attn(windows).view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return out[:, :h, :w].contiguous()


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(EncoderBlock(cfg, 0 if i in cfg.global_blocks else cfg.window)
                                    for i in range(cfg.depth))
        d = cfg.prompt_dim
        self.neck = nn.Sequential(nn.Conv2d(cfg.width, d, 1, bias=False), LayerNorm2d(d),
                                  nn.Conv2d(d, d, 3, padding=1, bias=False), LayerNorm2d(d))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


# -- prompt encoder ---------------------------------------------------------------------------------

class PositionEmbeddingRandom(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, features))

    def encode(self, coords: Tensor) -> Tensor:
        """Coordinates in [0, 1] → [sin, cos] of their random projections."""
        coords = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, h: int, w: int) -> Tensor:
        ones = torch.ones(h, w, device=self.positional_encoding_gaussian_matrix.device)
        y = (ones.cumsum(0) - 0.5) / h
        x = (ones.cumsum(1) - 0.5) / w
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        d, m = cfg.prompt_dim, cfg.mask_in_chans
        self.cfg = cfg
        self.pe_layer = PositionEmbeddingRandom(d // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, d) for _ in range(4))   # neg, pos, corner 1, 2
        self.not_a_point_embed = nn.Embedding(1, d)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, m // 4, 2, stride=2), LayerNorm2d(m // 4), nn.GELU(),
            nn.Conv2d(m // 4, m, 2, stride=2), LayerNorm2d(m), nn.GELU(), nn.Conv2d(m, d, 1))
        self.no_mask_embed = nn.Embedding(1, d)

    def _at(self, coords: Tensor) -> Tensor:
        size = self.cfg.image_size
        return self.pe_layer.encode((coords + 0.5).float() / size)

    def forward(self, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None,
                masks: Tensor | None) -> tuple[Tensor, Tensor]:
        """Sparse [B, N, d] and dense [B, d, g, g] embeddings; points/boxes in input-frame pixels."""
        d, g = self.cfg.prompt_dim, self.cfg.grid
        batch = next((t.shape[0] for t in (points[0] if points else None, boxes, masks) if t is not None), 1)
        device = self.no_mask_embed.weight.device
        sparse = [torch.empty(batch, 0, d, device=device)]
        if points is not None:
            coords, labels = points
            if boxes is None:   # a padding point stands in for the missing box
                coords = torch.cat([coords, torch.zeros(batch, 1, 2, device=coords.device)], dim=1)
                labels = torch.cat([labels, -torch.ones(batch, 1, device=labels.device)], dim=1)
            emb = self._at(coords)
            emb = torch.where((labels == -1)[..., None], self.not_a_point_embed.weight, emb)
            emb = emb + (labels == 0)[..., None] * self.point_embeddings[0].weight
            emb = emb + (labels == 1)[..., None] * self.point_embeddings[1].weight
            sparse.append(emb)
        if boxes is not None:
            corners = self._at(boxes.reshape(-1, 2, 2))
            corners = corners + torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
            sparse.append(corners)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, d, 1, 1).expand(batch, d, g, g)
        return torch.cat(sparse, dim=1), dense

    def dense_pe(self) -> Tensor:
        return self.pe_layer.grid(self.cfg.grid, self.cfg.grid)[None]


# -- mask decoder -----------------------------------------------------------------------------------

class DecoderAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may narrow the width (``downsample``)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        def split(x: Tensor) -> Tensor:
            b, n, c = x.shape
            return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        attn = torch.softmax((q @ k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1]), dim=-1)
        out = (attn @ v).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class TwoWayBlock(nn.Module):
    def __init__(self, cfg: SAMConfig, first: bool):
        super().__init__()
        d, h = cfg.prompt_dim, cfg.decoder_heads
        self.first = first   # the first block's self-attention sees no position embedding
        self.self_attn = DecoderAttention(d, h)
        self.norm1 = nn.LayerNorm(d)
        self.cross_attn_token_to_image = DecoderAttention(d, h, 2)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = MLPBlock(d, cfg.decoder_mlp, nn.ReLU)
        self.norm3 = nn.LayerNorm(d)
        self.norm4 = nn.LayerNorm(d)
        self.cross_attn_image_to_token = DecoderAttention(d, h, 2)

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.first:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        d = cfg.prompt_dim
        self.layers = nn.ModuleList(TwoWayBlock(cfg, i == 0) for i in range(cfg.decoder_depth))
        self.final_attn_token_to_image = DecoderAttention(d, cfg.decoder_heads, 2)
        self.norm_final_attn = nn.LayerNorm(d)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        queries = queries + self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries), keys


class MLP(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskDecoder(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        d, n = cfg.prompt_dim, cfg.multimask + 1
        self.transformer = TwoWayTransformer(cfg)
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(n, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, 2, stride=2), LayerNorm2d(d // 4), nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP([d, d, d, d // 8]) for _ in range(n))
        self.iou_prediction_head = MLP([d] + [cfg.iou_hidden] * 2 + [n])

    def forward(self, image: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """All 1 + multimask masks' logits [B, n, 4g, 4g] and their predicted IoUs [B, n]."""
        out = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([out[None].expand(sparse.shape[0], -1, -1), sparse], dim=1)
        src = torch.repeat_interleave(image, tokens.shape[0], dim=0) + dense
        pos = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        n = self.mask_tokens.weight.shape[0]
        up = self.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = up.shape
        masks = (hyper @ up.view(b, c, h * w)).view(b, n, h, w)
        return masks, self.iou_prediction_head(hs[:, 0])


class SAM(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)

    def decode(self, embedding: Tensor, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None,
               masks: Tensor | None, multimask: bool) -> tuple[Tensor, Tensor]:
        """Low-res mask logits and scores for one image's ``embedding`` [1, d, g, g]: the three
        multimask outputs, or the single-mask output."""
        sparse, dense = self.prompt_encoder(points, boxes, masks)
        logits, iou = self.mask_decoder(embedding, self.prompt_encoder.dense_pe(), sparse, dense)
        pick = slice(1, None) if multimask else slice(0, 1)
        return logits[:, pick], iou[:, pick]
