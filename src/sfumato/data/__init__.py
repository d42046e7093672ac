"""Files that ship with the package: the bundled model and its image-conditioned (unCLIP) variant."""

from pathlib import Path

BUNDLED_PATH = Path(__file__).resolve().parent / "bundled.safetensors"
BUNDLED_UNCLIP_PATH = BUNDLED_PATH.with_name("bundled-unclip.safetensors")   # an overlay of bundled.safetensors
