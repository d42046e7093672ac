"""sfumato: Stable Diffusion in PyTorch.

>>> import sfumato
>>> pipe = sfumato.load("model.safetensors")
>>> result = pipe.txt2img("a red circle on a blue background", seed=1)
>>> result.images[0].save("out.png")
"""

from .version import __version__


def load(path=None, **options):
    """Load a checkpoint (file or diffusers folder; None: the bundled model) into a
    :class:`sfumato.api.Pipeline`, optionally with an SDXL refiner or a checkpoint for the hires pass;
    ``options`` are :func:`sfumato.api.load`'s (dtype, device, loras, lora_dir, few_step, …)."""
    from .api import load as _load

    return _load(path, **options)


def load_segmenter(path, *, device="auto"):
    """A Segment Anything model (``sam_vit_{b,l,h}_*.pth``, its .safetensors, or a transformers SamModel
    folder) as a :class:`sfumato.pipeline.segment.Segmenter`: ``set_image(image)`` once, then
    ``predict(points=[(x, y, 1)], box=(x0, y0, x1, y1))`` → masks and scores."""
    from .api import resolve_device
    from .checkpoint.sam import load_sam
    from .pipeline.segment import Segmenter

    return Segmenter(load_sam(path, device=resolve_device(device)))


__all__ = ["load", "load_segmenter", "__version__"]
