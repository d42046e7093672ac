"""Build a model's components from a checkpoint: single file or diffusers folder, any storage dtype.

Modules are created on the ``meta`` device and take the loaded tensors with ``assign=True``. A
single safetensors file is memory-mapped (``stream.MappedFile``) and converted tensor by tensor,
each source's pages released as soon as its converted copy exists: the peak is about one model copy,
and no copy at all is made where the storage dtype is the wanted dtype. With ``low_memory`` the
modules stay on ``meta`` and read their weights from the mapping unit by unit as they run (see
``stream.stream_weights``); with ``by_stage`` each whole component is read in for its stage (the UNet
for sampling, the text encoders for a prompt, the VAE for a decode) and dropped after it. Every
component loads with strict key matching; keys left over must be documented ignorables.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..models.clip import build_text_encoder
from ..models.clip_vision import CLIPVisionTower
from ..models.unclip import NoiseAugmentor
from ..models.layers import resolve_compute_dtype
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from ..diffusion.schedule import scaled_linear_alphas_cumprod
from .convert_vae import normalize_vae_state_dict
from .detect import detect_spec, is_ignorable, prediction_marker, resolve_prediction
from .io import CHECK_LEGACY_BYTES, check_finite, load_file, sniff_format
from .stream import (MappedFile, fix_malloc_mmap_threshold, materialize, read_mapped, release, resident,
                     stream_weights, unet_units)
from .specs import BASE_KEY, BASE_SHA256_KEY, UNET_PREFIX, VAE_PREFIX, ModelSpec, TextSlot

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[nn.Module]
    alphas_cumprod: Tensor
    prediction_source: str
    path: Path
    storage_dtypes: dict[str, str] = field(default_factory=dict)
    low_memory: bool = False   # weights streamed from the file unit by unit (checkpoint.stream)
    by_stage: bool = False     # each component's weights read from the file for its stage only
    image_embedder: nn.Module | None = None    # Stable unCLIP: the CLIP image tower …
    noise_augmentor: nn.Module | None = None   # … and its embedding noise augmentation
    depth_estimator: nn.Module | None = None   # SD 2 depth: the MiDaS DPT-Hybrid the file carries (fp32)
    # another runtime for the plain UNet calls and whole-image decodes (backends.openvino), else None
    unet_backend: object | None = None
    decoder_backend: object | None = None

    @property
    def streamed(self) -> bool:
        """Weights kept in the file between uses (low-memory or by-stage): nothing to patch in place."""
        return self.low_memory or self.by_stage

    @property
    def family(self) -> str:
        return self.spec.family


def check_file(path: str | Path, what: str = "the weights") -> None:
    """Everything ``load_file`` checks (format, structure, allow-list, bounds) and finite values, without
    keeping anything: safetensors through a memory map whose pages are released as they are checked,
    zip pickles memory-mapped. A server runs it before unloading a model to load another one, so a
    file that cannot load never costs the model in use. A legacy (pre-zip) pickle cannot be mapped:
    it is read whole only up to ``CHECK_LEGACY_BYTES`` (real models in that format are larger, and
    reading one twice would double the memory), else only sniffed."""
    path = Path(path)
    if path.is_dir():
        return
    fmt = sniff_format(path)
    if fmt == "safetensors":
        mapped = MappedFile(path)
        check_finite(mapped.tensors, f"{what} of {path.name}", mapped.release)
    elif fmt == "torch-zip" or path.stat().st_size <= CHECK_LEGACY_BYTES:
        tensors, _ = load_file(path)
        check_finite(tensors, f"{what} of {path.name}")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A flat state dict in the original single-file layout, and the file's metadata."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    if path.is_dir():
        from .diffusers import read_diffusers_folder

        return read_diffusers_folder(path)
    return load_file(path)


def load_model(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    prediction: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    use_ema: bool = False,
    low_memory: bool = False,
    by_stage: bool = False,
) -> LoadedModel:
    """Load a checkpoint (and optionally a replacement VAE file) into ready-to-run modules.
    ``low_memory``: keep the weights in the (single safetensors) file and read each block in as it
    runs; the peak is then about one UNet block plus activations instead of the whole model.
    ``by_stage``: keep them in the file too, but read each component in whole for its stage (the
    generation loop holds the UNet for a whole sampling pass): the peak is the largest component in
    use plus its activations, at the cost of a conversion per stage."""
    if low_memory and by_stage:
        raise ValueError("low_memory and by_stage: choose one of them")
    path = Path(path)
    files: list[MappedFile] = []
    if path.is_file() and sniff_format(path) == "safetensors":
        sd, metadata, mapped = read_mapped(path)
        files.append(mapped)
    elif low_memory or by_stage:
        option = "low_memory" if low_memory else "by_stage"
        raise CheckpointError(f"{option}: needs a single .safetensors file to stream weights from, got {path}")
    else:
        sd, metadata = read_checkpoint(path)
    if BASE_KEY in metadata:
        sd, metadata = _overlay(path, sd, metadata, files)
    if low_memory:
        fix_malloc_mmap_threshold()
    vae_sd = read_vae_file(vae) if vae is not None else None
    return build_model(sd, metadata, path=path, vae_sd=vae_sd, prediction=prediction, dtype=dtype,
                       device=device, use_ema=use_ema, low_memory=low_memory, by_stage=by_stage, files=files)


def build_model(
    sd: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    *,
    path: Path,
    vae_sd: dict[str, Tensor] | None = None,
    prediction: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    use_ema: bool = False,
    low_memory: bool = False,
    by_stage: bool = False,
    files: list[MappedFile] | None = None,
) -> LoadedModel:
    """Modules from an original-layout state dict. ``device="meta"`` checks keys and shapes only.
    ``files``: the mappings `sd`'s tensors view, whose pages are released as tensors are converted;
    ``low_memory``, ``by_stage``: the modules stream their weights from `sd` (see ``load_model``)."""
    files = files or []
    spec = _fit_text_slots(detect_spec(sd, metadata), sd)
    if use_ema:
        sd = _with_ema(sd)
    parts, leftovers = split_state_dict(sd, spec)
    if vae_sd is not None:
        parts["vae"] = vae_sd
    elif not parts["vae"]:
        raise CheckpointError(f"{path.name} has no VAE weights (under '{VAE_PREFIX}'); pass a VAE file with --vae")
    unexpected = [k for k in leftovers if not is_ignorable(k)]
    if unexpected:
        raise CheckpointError(
            f"{path.name}: {len(unexpected)} keys belong to no component of a {spec.family} model, "
            f"e.g. {', '.join(unexpected[:5])}"
        )
    names = {"unet": "UNet", "vae": "VAE", **{f"text{i}": f"text encoder {i}" for i in range(len(spec.text))}}
    for name, part in parts.items():   # NaN/inf weights would make black images: refused here, by name
        check_finite(part, f"the {names.get(name, name)} weights of {path.name}", lambda t: release(t, files))
    storage = {name: _dtype_names(p) for name, p in parts.items()}
    meta = torch.device(device).type == "meta"
    low_memory = low_memory and not meta
    by_stage = by_stage and not meta
    streamed = low_memory or by_stage

    def build(make, name: str, what: str, units=lambda m: [m]) -> nn.Module:
        if not streamed:
            return _build(make, parts[name], what, dtype, device, files)
        module = _build(make, parts[name], what, dtype, "meta", files)
        return stream_weights(module, parts[name], units(module), dtype=dtype, device=device, files=files)

    unet = build(lambda: UNetModel(spec.unet), "unet", "UNet", unet_units if low_memory else lambda m: [m])
    if streamed:  # its weights sit on `meta` between calls: state the compute dtype they would give
        unet.dtype_override = resolve_compute_dtype(dtype, torch.device(device))
    vae_m = build(lambda: AutoencoderKL(spec.vae), "vae", "VAE")
    encoders = [build(lambda slot=slot: build_text_encoder(slot.config), f"text{i}", f"text encoder {i}")
                for i, slot in enumerate(spec.text)]
    # only an SD 2.x file without an override or a marker runs the UNet here (a streamed one: whole)
    probe = spec.family == "sd2" and prediction is None and prediction_marker(sd, metadata) is None
    with resident(unet) if probe else nullcontext():
        spec, source = resolve_prediction(spec, sd, metadata, prediction, None if meta else unet)
    embedder = augmentor = None
    if spec.image_embedder is not None:
        embedder = _build(lambda: CLIPVisionTower(spec.image_embedder.vision), parts["embedder"],
                          "image embedder", dtype, device, files)
        augmentor = _noise_augmentor(spec, parts["noise_augmentor"], device)
    estimator = None
    if parts.get("depth_model"):   # ldm's depth2img checkpoints carry the MiDaS that made their training maps
        from ..models.midas import midas_from_state

        shapes = _shapes(parts["depth_model"])
        try:
            with torch.device("meta"):
                midas_from_state(shapes)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path.name}: depth_model.model.* is not a MiDaS DPT ({e})") from None
        estimator = _build(lambda: midas_from_state(shapes), parts["depth_model"], "depth model (MiDaS)",
                           torch.float32, device, files)
    ac = sd.get("alphas_cumprod")
    alphas_cumprod = ac.to(torch.float32).cpu() if ac is not None and not ac.is_meta else scaled_linear_alphas_cumprod(*spec.betas)
    return LoadedModel(spec, unet, vae_m, encoders, alphas_cumprod, source, path, storage, low_memory, by_stage,
                       embedder, augmentor, estimator)


def _shapes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys and shapes only (meta tensors): enough to pick a configuration."""
    return {k: torch.empty(v.shape, device="meta") for k, v in sd.items()}


def _noise_augmentor(spec: ModelSpec, sd: dict[str, Tensor], device) -> nn.Module:
    """unCLIP's noise augmentor: its schedule's square roots as the file has them (else computed), its
    embedding statistics where the file has them (ldm keeps them out of the state dict: identity)."""
    e = spec.image_embedder
    module = NoiseAugmentor(e.dim, e.timesteps, e.max_noise_level)
    own = module.state_dict()
    for key, value in sd.items():
        if key not in own:
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"noise_augmentor.{key}: shape {list(value.shape)}, expected {list(own[key].shape)}")
        if not value.is_meta:   # a meta build checks shapes only
            own[key] = materialize(value, torch.float32, "cpu", [])
    module.load_state_dict(own)
    return module   # tiny: kept on the CPU, where the embedding is mixed and noised


def _overlay(path: Path, sd: Mapping[str, Tensor], metadata: Mapping[str, str], files: list[MappedFile]):
    """A variant stored as an overlay of a base file (the bundled model's unCLIP variant): the base's
    tensors with the overlay's on top, and the overlay's metadata. The base is a bare file name in the
    overlay's folder, checked against the sha256 the overlay records."""
    from .io import sha256_file

    name = metadata[BASE_KEY]
    if not name or name != Path(name).name or name in (".", ".."):
        raise CheckpointError(f"{path.name}: base {name!r} is not a file name in its folder")
    base = path.parent / name
    if not base.is_file():
        raise CheckpointError(f"{path.name} is an overlay of {name}, which is not in {path.parent}")
    expected = metadata.get(BASE_SHA256_KEY)
    if expected is None or sha256_file(base) != expected:
        raise CheckpointError(f"{path.name} is an overlay of another {name} (sha256 differs)")
    if sniff_format(base) == "safetensors":
        base_sd, _, mapped = read_mapped(base)
        files.append(mapped)
    else:
        base_sd, _ = load_file(base)
    return {**base_sd, **sd}, dict(metadata)


def split_state_dict(sd: Mapping[str, Tensor], spec: ModelSpec) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Per-component state dicts with their prefixes stripped, and the keys no component claims."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    prefixes.update({f"text{i}": slot.prefix for i, slot in enumerate(spec.text)})
    if spec.image_embedder is not None:
        prefixes.update({"embedder": spec.image_embedder.prefix, "noise_augmentor": "noise_augmentor."})
    if spec.is_depth:
        prefixes["depth_model"] = "depth_model.model."
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in prefixes}
    leftovers = []
    for key, value in sd.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix) and not is_ignorable(key):
                parts[name][key[len(prefix):]] = value
                break
        else:
            leftovers.append(key)
    parts["vae"] = normalize_vae_state_dict(parts["vae"])
    return parts, leftovers


def read_vae_file(path: str | Path) -> dict[str, Tensor]:
    """A standalone VAE: bare LDM keys, keys under ``first_stage_model.``, or a diffusers VAE."""
    from .convert_vae import diffusers_vae_to_ldm

    sd, _ = read_checkpoint(path) if not Path(path).is_dir() else _read_diffusers_vae(Path(path))
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        sd = diffusers_vae_to_ldm(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.") and k != "model_ema.decay"}
    if not {"decoder.conv_in.weight", "post_quant_conv.weight"} <= set(sd):
        raise CheckpointError(f"{Path(path).name} holds no VAE weights (no decoder.conv_in / post_quant_conv)",
                              "the file holds no VAE weights")
    check_finite(sd, f"the weights of VAE {Path(path).name}")
    return normalize_vae_state_dict(sd)


def _read_diffusers_vae(folder: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from .diffusers import find_weights

    return load_file(find_weights(folder))


def _build(make, sd: dict[str, Tensor], what: str, dtype: torch.dtype, device,
           files: list[MappedFile] | None = None) -> nn.Module:
    with torch.device("meta"):
        module = make()
    # tensor by tensor: each mapped source leaves the resident set once its converted copy exists
    sd = {k: materialize(v, dtype, device, files or []) for k, v in sd.items()}
    result = module.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {', '.join(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise CheckpointError(f"{what} weights do not match the detected configuration: {'; '.join(parts)}")
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta and torch.device(device).type != "meta":
        raise CheckpointError(f"{what}: tensors not provided by the checkpoint: {', '.join(still_meta[:5])}")
    return module.eval().requires_grad_(False)


def _fit_text_slots(spec: ModelSpec, sd: Mapping[str, Tensor]) -> ModelSpec:
    """Diffusers folders store SD 2.x's OpenCLIP-H with its unused last layer dropped (23 of 24):
    keep the depth the file has and read its last layer where the original reads the penultimate."""
    slots = []
    for slot in spec.text:
        n = _count_layers(sd, slot)
        if n == slot.config.layers - 1 and slot.layer <= -2:
            slot = replace(slot, config=replace(slot.config, layers=n), layer=slot.layer + 1)
        if slot.config.layout == "openclip" and slot.prefix + "text_projection" not in sd and not slot.pooled:
            slot = replace(slot, config=replace(slot.config, projection_dim=None))
        slots.append(slot)
    return replace(spec, text=tuple(slots))


def _count_layers(sd: Mapping[str, Tensor], slot: TextSlot) -> int:
    marker = "text_model.encoder.layers." if slot.config.layout == "hf" else "transformer.resblocks."
    head = slot.prefix + marker
    idx = {int(k[len(head):].split(".", 1)[0]) for k in sd if k.startswith(head)}
    return len(idx)


def _with_ema(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace the UNet's weights by the EMA copy LDM stores as ``model_ema.<name without dots>``."""
    out = dict(sd)
    found = 0
    for key in sd:
        if key.startswith(UNET_PREFIX):
            ema_key = "model_ema." + ("diffusion_model." + key[len(UNET_PREFIX):]).replace(".", "")
            if ema_key in sd:
                out[key] = sd[ema_key]
                found += 1
    if not found:
        raise CheckpointError("EMA weights were asked for, but the file has no 'model_ema.' copy")
    return out


def _dtype_names(sd: Mapping[str, Tensor]) -> str:
    names = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values() if v.is_floating_point()})
    return "/".join(names) or "none"
