"""AUTOMATIC1111 hypernetworks: residual MLPs on the keys' and values' inputs of attention.

A hypernetwork holds, per context width, two small MLPs (for ``to_k`` and ``to_v``). Every
attention layer whose key/value input has a width the file covers sees ``c + mlp_k(c) · strength``
in place of its keys' input ``c`` (and likewise for the values); with several hypernetworks the
inputs pass through each in turn. As in A1111 this is any attention whose input width matches:
cross-attention's text context, and self-attention where a file also has that feature width.

The ``.pt`` file (read through the checkpoint allow-list) is a dict: each width (an int) maps to a
list of two state dicts (``to_k``'s MLP, ``to_v``'s MLP) of one ``nn.Sequential`` named ``linear``
whose entries follow A1111's order per layer: Linear, activation (none for ``linear``; on the last
layer only with ``activate_output``), LayerNorm (``is_layer_norm``), Dropout (``dropout_structure``,
or the older ``use_dropout`` / ``last_layer_dropout`` flags). The other entries are its settings.

Prompts name them as ``<hypernet:name:strength>`` (``find_hypernetwork`` searches a folder).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..checkpoint.io import check_finite, load_object
from ..errors import SfumatoError
from ..checkpoint.folders import ModelFolder

HYPERNETWORK_EXTENSIONS = (".pt",)
_NAMED_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _activation(name: str) -> type[nn.Module]:
    """A1111's names: its few aliases, then any ``torch.nn`` activation class by its lower-case name."""
    if name in _NAMED_ACTIVATIONS:
        return _NAMED_ACTIVATIONS[name]
    import torch.nn.modules.activation as activations

    for attr in dir(activations):
        cls = getattr(activations, attr)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == activations.__name__ \
                and attr.lower() == name:
            return cls
    raise SfumatoError(f"hypernetwork: unknown activation_func {name!r}")


def _dropout_structure(layers: Sequence[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """The per-layer dropout A1111 derives for files from before ``dropout_structure``."""
    if not use_dropout or len(layers) < 3:
        return [0.0] * len(layers)
    return [0.0] + [0.3] * (len(layers) - 3) + [0.3 if last_layer_dropout else 0.0, 0.0]


class HypernetworkModule(nn.Module):
    """One residual MLP ``x + linear(x) · strength``, its Sequential laid out as A1111's."""

    def __init__(self, width: int, structure: Sequence[float] = (1, 2, 1), activation: str | None = None,
                 layer_norm: bool = False, dropout: Sequence[float] | None = None, activate_output: bool = False):
        super().__init__()
        if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
            raise SfumatoError(f"hypernetwork: layer_structure must start and end with 1, got {list(structure)}")
        dropout = list(dropout) if dropout is not None else [0.0] * len(structure)
        if len(dropout) != len(structure):
            raise SfumatoError(f"hypernetwork: dropout_structure {dropout} does not match layer_structure {list(structure)}")
        dims = [int(width * m) for m in structure]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(a, b))
            last = i == len(dims) - 2
            if activation not in (None, "linear") and (not last or activate_output):
                layers.append(_activation(activation)())
            if layer_norm:
                layers.append(nn.LayerNorm(b))
            if dropout[i + 1] > 0:
                layers.append(nn.Dropout(dropout[i + 1]))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: Tensor, strength: float = 1.0) -> Tensor:
        return x + (self.linear(x.float()) * strength).to(x.dtype)


class Hypernetwork(nn.Module):
    """Per key/value input width, the ``(k, v)`` MLPs, and the settings A1111 writes with them."""

    def __init__(self, widths: Sequence[int], *, name: str = "hypernetwork", structure: Sequence[float] = (1, 2, 1),
                 activation: str | None = "linear", layer_norm: bool = False, dropout: Sequence[float] | None = None,
                 activate_output: bool = False):
        super().__init__()
        self.name = name
        self.settings: dict[str, Any] = {
            "layer_structure": list(structure), "activation_func": activation, "is_layer_norm": layer_norm,
            "dropout_structure": list(dropout) if dropout is not None else [0.0] * len(structure),
            "activate_output": activate_output,
        }
        self.layers = nn.ModuleDict({
            str(w): nn.ModuleList(HypernetworkModule(w, structure, activation, layer_norm, dropout, activate_output)
                                  for _ in range(2))
            for w in widths})

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in self.layers]

    def pair(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        mods = self.layers[str(width)] if str(width) in self.layers else None
        return (mods[0], mods[1]) if mods is not None else None

    def a1111_dict(self, step: int = 0) -> dict[Any, Any]:
        """The ``.pt`` contents A1111 writes: ``{width: [k state, v state]}`` and the settings."""
        out: dict[Any, Any] = {w: [{k: t.detach().clone() for k, t in m.state_dict().items()} for m in self.pair(w)]
                               for w in self.widths}
        use_dropout = any(d > 0 for d in self.settings["dropout_structure"])
        return {**out, "name": self.name, "step": step, **self.settings, "weight_initialization": "Normal",
                "use_dropout": use_dropout, "last_layer_dropout": False}


def load_hypernetwork(path: str | Path, name: str | None = None) -> Hypernetwork:
    """An A1111 hypernetwork ``.pt``; ``name`` defaults to the file's stem. Every width's two MLPs
    must load strictly into the layout its settings describe."""
    path = Path(path)
    data = load_object(path)
    if not isinstance(data, dict):
        raise SfumatoError(f"{path.name}: not a hypernetwork (a {type(data).__name__}, not a dict)")
    widths = [k for k in data if isinstance(k, int) and not isinstance(k, bool)]
    if not widths:
        raise SfumatoError(f"{path.name}: not a hypernetwork (no integer width keys)")
    structure = list(data.get("layer_structure") or (1, 2, 1))
    dropout = data.get("dropout_structure") or _dropout_structure(
        structure, bool(data.get("use_dropout", False)), bool(data.get("last_layer_dropout", False)))
    states = {w: data[w] for w in widths}
    _check_sizes(path, states, structure, dropout)
    net = Hypernetwork(widths, name=name or path.stem, structure=structure,
                       activation=data.get("activation_func"), layer_norm=bool(data.get("is_layer_norm", False)),
                       dropout=dropout, activate_output=bool(data.get("activate_output", True)))
    for w in widths:
        for module, state, which in zip(net.pair(w), states[w], "kv"):
            check_finite(state, f"the weights of hypernetwork {path.name}")
            try:
                module.load_state_dict(state)
            except RuntimeError as e:
                detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
                raise SfumatoError(f"{path.name}: width {w}'s {which} MLP does not fit the file's settings: "
                                   f"{detail}") from None
    return net.eval().requires_grad_(False)


def _check_sizes(path: Path, states: dict[int, Any], structure: list, dropout: Any) -> None:
    """The settings of an untrusted file are checked before any module is built from them: sane
    widths and layer multipliers, two state dicts of tensors per width, and no more parameters than
    the file's tensors hold (a crafted ``layer_structure`` must not allocate gigabytes)."""
    if not 2 <= len(structure) <= 16 or not all(isinstance(m, (int, float)) and not isinstance(m, bool)
                                                  and 0 < m <= 64 for m in structure):
        raise SfumatoError(f"{path.name}: not a hypernetwork (layer_structure must be 2–16 multipliers in (0, 64])")
    if not isinstance(dropout, (list, tuple)) or not all(isinstance(d, (int, float)) for d in dropout):
        raise SfumatoError(f"{path.name}: not a hypernetwork (malformed dropout_structure)")
    held = 0
    for w, pair in states.items():
        if not 1 <= w <= 16384:
            raise SfumatoError(f"{path.name}: not a hypernetwork (width {w} out of range)")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
                isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items())
                for sd in pair):
            raise SfumatoError(f"{path.name}: width {w} must hold two state dicts (k and v) of tensors")
        held += sum(v.numel() for sd in pair for v in sd.values())
    dims = {w: [int(w * m) for m in structure] for w in states}
    needed = sum(2 * sum(a * b + b for a, b in zip(d, d[1:])) for d in dims.values())
    if needed > held:
        raise SfumatoError(f"{path.name}: its settings describe {needed} parameters but it holds {held}")


@contextmanager
def hypernetworks_applied(unet: nn.Module, nets: Sequence[tuple[Hypernetwork, float]]) -> Iterator[None]:
    """Within the block, each attention layer's ``to_k`` / ``to_v`` input goes through the ``(net,
    strength)`` pairs' MLPs of its width, in order; hooks are removed on exit. The networks move
    to the UNet's device."""
    from ..checkpoint.stream import module_device

    device = module_device(unet)
    for net, _ in nets:
        net.to(device)
    handles = []

    def hook(chain: list[tuple[HypernetworkModule, float]]):
        def pre(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = args[0]
            for mlp, strength in chain:
                x = mlp(x, strength)
            return (x, *args[1:])
        return pre

    try:
        for name, module in unet.named_modules():
            if not (hasattr(module, "to_k") and hasattr(module, "to_v")):
                continue
            width = module.to_k.in_features
            pairs = [(net.pair(width), s) for net, s in nets if net.pair(width) is not None]
            for i, attr in enumerate(("to_k", "to_v")):
                chain = [(pair[i], s) for pair, s in pairs]
                if chain:
                    handles.append(getattr(module, attr).register_forward_pre_hook(hook(chain)))
        yield
    finally:
        for h in handles:
            h.remove()


_TAG = re.compile(r"<hypernet:([^>]*)>")


def parse_hypernet_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove A1111's ``<hypernet:name>`` / ``<hypernet:name:strength>`` tags (strength 1.0 by default)."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        tag = match[0]
        name, *args = [a.strip() for a in match[1].split(":")]
        if not name or len(args) > 1:
            raise SfumatoError(f"prompt tag {tag}: expected <hypernet:name> or <hypernet:name:strength>")
        try:
            strength = float(args[0]) if args else 1.0
        except ValueError:
            raise SfumatoError(f"prompt tag {tag}: {args[0]!r} is not a number") from None
        if not math.isfinite(strength):
            raise SfumatoError(f"prompt tag {tag}: strength must be finite")
        found.append((name, strength))
        return ""

    return _TAG.sub(take, prompt), found


def find_hypernetwork(name: str, directory: str | Path) -> Path:
    """The hypernetwork file ``name`` means inside ``directory`` (see ``checkpoint.folders``: with or without
    extension, optionally in a sub-folder, a bare name found in sub-folders); links leading out of the
    folder and names that leave it are refused, a missing or ambiguous name is an error."""
    return hypernetwork_folder(directory).path(name)


def hypernetwork_folder(directory: str | Path, label: str = "hypernetwork folder") -> ModelFolder:
    """The hypernetwork files in ``directory``, as prompt tags name them."""
    return ModelFolder("hypernetwork", directory, HYPERNETWORK_EXTENSIONS, label=label)