"""IP-Adapter (Ye et al. 2023): an image prompt through decoupled cross-attention.

A file holds an image projection (``image_proj.*``) that turns a CLIP image embedding into a few
context tokens, and per cross-attention layer of the UNet a key and a value projection of those tokens
(``ip_adapter.N.to_k_ip.weight``, ``ip_adapter.N.to_v_ip.weight``). Every cross-attention layer then
computes, with its own query and heads,

    attn(q, k_text, v_text) + scale · attn(q, to_k_ip(ip_tokens), to_v_ip(ip_tokens))

and only then its output projection ``to_out`` (the image term is added before it, as in the reference
and diffusers' ``IPAdapterAttnProcessor2_0``). Several adapters add their terms in order.

Layout. ``.safetensors`` files carry flat ``image_proj.`` / ``ip_adapter.`` keys; ``.bin`` files a dict
``{"image_proj": {...}, "ip_adapter": {...}}``, which the allow-listed loader flattens to the same keys.
``N`` counts the attention processors of diffusers' UNet in ``unet.attn_processors`` order — down
blocks, then up blocks, then the middle block (the order of registration), each transformer block's
``attn1`` then ``attn2`` — so the cross-attention layers are N = 1, 3, 5, …; in our LDM layout that is
input_blocks' ``attn2`` in order, then output_blocks', then the middle block's (``cross_attention_layers``).
The attribute paths of :class:`IPAdapter` are the file's keys ("the checkpoint is the schema").

Variants. *Base*: ``image_proj.proj`` (Linear clip_dim → tokens · cross_dim), reshape, ``image_proj.norm``
(LayerNorm); input the CLIP tower's ``image_embeds``, and under classifier-free guidance the uncond row
gets the projection of zeros. *Plus*: a perceiver Resampler (``image_proj.latents``, ``proj_in``,
``layers.L.0`` attention, ``layers.L.1`` feed-forward, ``proj_out``, ``norm_out``) over the tower's
penultimate hidden states; the uncond row gets the Resampler of the hidden states of a zero image.

Rows. The hooks follow the run loop's UNet calls: one image per call, its uncond row first, then its cond
rows (one per AND part); row 0 gets the uncond tokens, the others the cond tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint.io import check_finite, load_file
from ..errors import CheckpointError, ParamError

PREFIXES = ("image_proj.", "ip_adapter.")


# -- the image projections ------------------------------------------------------------------------------


class ImageProjModel(nn.Module):
    """The base variant's projection: ``proj`` to ``tokens`` × ``cross_dim``, reshaped, LayerNorm'd."""

    def __init__(self, clip_dim: int, cross_dim: int, tokens: int = 4):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Linear(clip_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        """[B, clip_dim] → [B, tokens, cross_dim]."""
        x = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(embeds.shape[0], self.tokens, self.cross_dim))


class _PerceiverAttention(nn.Module):
    """The Resampler's attention: the latents' queries over the image features and the latents."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, inner = heads, dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """The plus variant's projection (keys as the reference's ``Resampler``): ``queries`` learnt latents
    attend ``depth`` times to the image's hidden states, then ``proj_out`` and ``norm_out``."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, queries: int, embed_dim: int,
                 output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([
            _PerceiverAttention(dim, dim_head, heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * ff_mult, dim, bias=False)),
        ]) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        """[B, tokens, embed_dim] hidden states → [B, queries, output_dim]."""
        x = self.proj_in(x.to(self.proj_in.weight.dtype))
        latents = self.latents.repeat(x.shape[0], 1, 1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


# -- the adapter ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IPAdapterConfig:
    """What an IP-Adapter file's shapes say: its variant, the CLIP input width it projects (image_embeds'
    width for base, the tower's hidden width for plus), the context width and token count it makes, and
    the inner width of each cross-attention layer it steers (in file order). ``resampler``: (dim, depth,
    dim_head, heads) of a plus adapter's Resampler."""

    kind: str
    clip_dim: int
    cross_dim: int
    tokens: int
    layers: tuple[int, ...]
    resampler: tuple[int, int, int, int] | None = None


class _IPLayer(nn.Module):
    def __init__(self, cross_dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, inner, bias=False)


class IPAdapter(nn.Module):
    """An IP-Adapter: ``image_proj`` (ImageProjModel or Resampler) and ``ip_adapter[str(2i+1)]`` per
    cross-attention layer i."""

    def __init__(self, cfg: IPAdapterConfig, name: str = "ip-adapter"):
        super().__init__()
        self.cfg, self.name = cfg, name
        if cfg.kind == "plus":
            dim, depth, dim_head, heads = cfg.resampler
            self.image_proj: nn.Module = Resampler(dim, depth, dim_head, heads, cfg.tokens, cfg.clip_dim, cfg.cross_dim)
        else:
            self.image_proj = ImageProjModel(cfg.clip_dim, cfg.cross_dim, cfg.tokens)
        self.ip_adapter = nn.ModuleDict({str(2 * i + 1): _IPLayer(cfg.cross_dim, inner)
                                         for i, inner in enumerate(cfg.layers)})

    def layer(self, i: int) -> _IPLayer:
        return self.ip_adapter[str(2 * i + 1)]

    def tokens(self, features: Tensor) -> Tensor:
        """The context tokens of CLIP features (base: image_embeds [B, clip_dim]; plus: penultimate
        hidden states [B, n, clip_dim]): [B, tokens, cross_dim] in fp32."""
        return self.image_proj(features).float()


def ip_adapter_config(sd: dict[str, Tensor]) -> IPAdapterConfig:
    """The configuration an IP-Adapter state dict (flat keys, ``image_proj.`` / ``ip_adapter.``) describes;
    a CheckpointError when it is not one, or one of a variant not supported (full face, FaceID)."""
    layers: dict[int, int] = {}
    for key, value in sd.items():
        if key.startswith("ip_adapter."):
            index, _, rest = key.removeprefix("ip_adapter.").partition(".")
            if not index.isdigit() or rest not in ("to_k_ip.weight", "to_v_ip.weight") or value.ndim != 2:
                raise CheckpointError(f"unexpected IP-Adapter key {key!r} (IP-Adapter LoRA / FaceID layers are "
                                      "not supported)")
            layers[int(index)] = value.shape[0]
        elif not key.startswith("image_proj."):
            raise CheckpointError(f"unexpected key {key!r}: not an IP-Adapter (expected image_proj.*, "
                                  "ip_adapter.*)")
    if not layers:
        raise CheckpointError("not an IP-Adapter: no ip_adapter.N.to_k_ip.weight keys")
    order = sorted(layers)
    if order != list(range(1, 2 * len(order), 2)):
        raise CheckpointError(f"IP-Adapter layers {order[:6]}…: expected 1, 3, 5, … (one per cross-attention layer)")
    for i in order:
        for which in ("to_k_ip", "to_v_ip"):
            if f"ip_adapter.{i}.{which}.weight" not in sd:
                raise CheckpointError(f"IP-Adapter layer {i} lacks {which}.weight")
    cross_dim = sd[f"ip_adapter.{order[0]}.to_k_ip.weight"].shape[1]
    inner = tuple(layers[i] for i in order)
    if "image_proj.proj.weight" in sd and "image_proj.norm.weight" in sd and sd["image_proj.proj.weight"].ndim == 2:
        out, clip_dim = sd["image_proj.proj.weight"].shape
        if out % cross_dim or sd["image_proj.norm.weight"].shape[0] != cross_dim:
            raise CheckpointError(f"image_proj makes {out} values, not tokens of the layers' width {cross_dim}")
        return IPAdapterConfig("base", clip_dim, cross_dim, out // cross_dim, inner)
    if "image_proj.latents" in sd and "image_proj.proj_in.weight" in sd:
        _, queries, dim = sd["image_proj.latents"].shape
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("image_proj.layers."))
        dim_head = 64   # the reference's (diffusers reads heads as to_q's width / 64 too)
        heads = sd["image_proj.layers.0.0.to_q.weight"].shape[0] // dim_head
        output = sd["image_proj.proj_out.weight"].shape[0]
        if output != cross_dim:
            raise CheckpointError(f"image_proj makes tokens of width {output}, the layers take {cross_dim}")
        return IPAdapterConfig("plus", sd["image_proj.proj_in.weight"].shape[1], cross_dim, queries, inner,
                               (dim, depth, dim_head, heads))
    raise CheckpointError("unsupported IP-Adapter image projection (base and plus are supported; not full-face "
                          "or FaceID)")


def load_ip_adapter(path: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> IPAdapter:
    """An IP-Adapter file (``.safetensors`` with flat keys, or a ``.bin`` through the allow-listed loader),
    its weights finite, ready on ``device`` in ``dtype``. CheckpointError when it is not one."""
    path = Path(path)
    sd, _ = load_file(path)
    try:
        cfg = ip_adapter_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}", str(e)) from None
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:   # crafted keys or shapes
        raise CheckpointError(f"{path.name}: not an IP-Adapter of a known layout ({e!r})",
                              "not an IP-Adapter of a known layout") from None
    check_finite(sd, f"the weights of IP-Adapter {path.name}")
    with torch.device("meta"):
        adapter = IPAdapter(cfg, path.stem)
    try:
        adapter.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise CheckpointError(f"{path.name}: the weights do not fit an IP-Adapter of their shapes: {detail}") from None
    return adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -- fitting and hooking a UNet -------------------------------------------------------------------------


def cross_attention_layers(unet: nn.Module) -> list[nn.Module]:
    """The UNet's cross-attention modules (every transformer block's ``attn2``) in the order IP-Adapter
    files number them: input blocks, output blocks, then the middle block (diffusers' down, up, mid)."""
    out = []
    for part in ("input_blocks", "output_blocks", "middle_block"):
        out += [m.attn2 for m in getattr(unet, part).modules() if hasattr(m, "attn2") and hasattr(m, "attn1")]
    return out


def check_fits(adapter: IPAdapter, unet: nn.Module, field: str) -> None:
    """A ParamError naming ``field`` when the adapter was made for another UNet (another family)."""
    layers = cross_attention_layers(unet)
    cfg = adapter.cfg
    if len(cfg.layers) != len(layers):
        raise ParamError(field, f"IP-Adapter {adapter.name!r} steers {len(cfg.layers)} cross-attention layers, this "
                                f"model has {len(layers)} (an adapter for another model family?)")
    context = layers[0].to_k.in_features
    if cfg.cross_dim != context:
        raise ParamError(field, f"IP-Adapter {adapter.name!r} makes context tokens of width {cfg.cross_dim}, this "
                                f"model's cross-attention takes {context} (an adapter for another model family?)")
    for i, (inner, attn) in enumerate(zip(cfg.layers, layers)):
        if inner != attn.to_k.out_features:
            raise ParamError(field, f"IP-Adapter {adapter.name!r}: layer {2 * i + 1} has width {inner}, the model's "
                                    f"cross-attention layer {i} has {attn.to_k.out_features}")


@dataclass
class ImagePrompt:
    """One adapter's image prompt for a run: the adapter, its context tokens for the cond rows and for the
    uncond row ([tokens, cross_dim] each), its scale and its span of the run (step fractions
    ``start`` ≤ f ≤ ``end``; an empty span, start ≥ end, never steers)."""

    adapter: IPAdapter
    cond: Tensor
    uncond: Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, fraction: float) -> bool:
        return self.scale != 0 and self.start < self.end and self.start <= fraction <= self.end


@contextmanager
def image_prompts_applied(unet: nn.Module, prompts: Sequence[ImagePrompt],
                          fraction: Callable[[], float] = lambda: 0.0) -> Iterator[None]:
    """Within the block every cross-attention layer of ``unet`` adds the image prompts' attention (those
    active at ``fraction()``, the run's step fraction) before its output projection; each UNet call's row 0
    is the uncond row. Hooks are removed on exit, also after an error. Keys and values of the tokens
    are computed once per layer, on the UNet's device in its compute dtype."""
    from ..checkpoint.stream import module_device

    prompts = [p for p in prompts if p.scale != 0 and p.start < p.end]
    if not prompts:
        yield
        return
    layers = cross_attention_layers(unet)
    for p in prompts:
        check_fits(p.adapter, unet, "ip_adapters")
    device = module_device(unet)
    dtype = getattr(unet, "compute_dtype", torch.float32)
    kv: list[list[tuple[Tensor, Tensor]]] = []
    for i in range(len(layers)):
        row = []
        for p in prompts:
            ip = p.adapter.layer(i)
            tokens = torch.stack([p.uncond, p.cond]).to(device, ip.to_k_ip.weight.dtype)   # [2, T, D]
            row.append((ip.to_k_ip(tokens).to(dtype), ip.to_v_ip(tokens).to(dtype)))
        kv.append(row)
    handles = []
    try:
        for i, attn in enumerate(layers):
            handles += _hook(attn, kv[i], prompts, fraction)
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(attn: nn.Module, kv: list[tuple[Tensor, Tensor]], prompts: Sequence[ImagePrompt],
          fraction: Callable[[], float]) -> list:
    """A hook keeping ``attn``'s query, and one adding the active prompts' attention to ``to_out``'s input."""
    state: dict[str, Tensor | None] = {"q": None}

    def keep_q(module: nn.Module, args: tuple, output: Tensor) -> None:
        state["q"] = output

    def add_ip(module: nn.Module, args: tuple) -> tuple:
        h, q = args[0], state["q"]
        state["q"] = None
        f = fraction()
        active = [(p, k, v) for p, (k, v) in zip(prompts, kv) if p.active(f)]
        if not active or q is None:
            return args
        b, heads = q.shape[0], attn.heads
        rows = torch.ones(b, dtype=torch.long, device=q.device)
        rows[0] = 0   # the uncond row
        qh = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        for p, k, v in active:
            kh, vh = (t[rows].view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (k, v))
            out = F.scaled_dot_product_attention(qh, kh.to(qh.dtype), vh.to(qh.dtype))
            h = h + p.scale * out.transpose(1, 2).reshape(b, -1, q.shape[-1]).to(h.dtype)
        return (h, *args[1:])

    return [attn.to_q.register_forward_hook(keep_q), attn.to_out[0].register_forward_pre_hook(add_ip)]


def infotext_module(adapter: IPAdapter, encoder_width: int) -> str:
    """The preprocessor name sd-webui-controlnet writes for such a unit: a ViT-bigG/14 encoder (width 1664)
    ``ip-adapter_clip_sdxl``; a ViT-H/14 (or other) encoder with an SDXL adapter (context width 2048)
    ``ip-adapter_clip_sdxl_plus_vith``, with any other ``ip-adapter_clip_sd15``."""
    if encoder_width == 1664:
        return "ip-adapter_clip_sdxl"
    return "ip-adapter_clip_sdxl_plus_vith" if adapter.cfg.cross_dim == 2048 else "ip-adapter_clip_sd15"
