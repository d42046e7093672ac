"""sfumato: Stable Diffusion in PyTorch.

>>> import sfumato
>>> pipe = sfumato.load("model.safetensors")
>>> result = pipe.txt2img("a red circle on a blue background", seed=1)
>>> result.images[0].save("out.png")
"""

from .version import __version__


def load(path=None, *, vae=None, prediction=None, dtype=None, device="auto", refiner=None, hires=None, loras=None,
         lora_dir=None, embeddings_dir=None, low_memory=False, hypernet_dir=None, by_stage=False,
         compile=False, no_half_vae=False, safety_checker=None):
    """Load a checkpoint (file or diffusers folder; None: the bundled model) into a
    :class:`sfumato.api.Pipeline`, optionally with an SDXL refiner or a checkpoint for the hires pass."""
    from .api import load as _load

    return _load(path, vae=vae, prediction=prediction, dtype=dtype, device=device, refiner=refiner, hires=hires,
                 loras=loras,
                 lora_dir=lora_dir, embeddings_dir=embeddings_dir, low_memory=low_memory, hypernet_dir=hypernet_dir,
                 by_stage=by_stage, compile=compile, no_half_vae=no_half_vae, safety_checker=safety_checker)


def load_segmenter(path, *, device="auto"):
    """A Segment Anything model (``sam_vit_{b,l,h}_*.pth``, its .safetensors, or a transformers SamModel
    folder) as a :class:`sfumato.pipeline.segment.Segmenter`: ``set_image(image)`` once, then
    ``predict(points=[(x, y, 1)], box=(x0, y0, x1, y1))`` → masks and scores."""
    from .api import resolve_device
    from .checkpoint.sam import load_sam
    from .pipeline.segment import Segmenter

    return Segmenter(load_sam(path, device=resolve_device(device)))


__all__ = ["load", "load_segmenter", "__version__"]
