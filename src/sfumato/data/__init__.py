"""Files that ship with the package: the bundled model, its image-conditioned (unCLIP) variant and its
AnimateDiff motion module."""

from pathlib import Path

BUNDLED_PATH = Path(__file__).resolve().parent / "bundled.safetensors"
BUNDLED_UNCLIP_PATH = BUNDLED_PATH.with_name("bundled-unclip.safetensors")   # an overlay of bundled.safetensors
BUNDLED_MOTION_PATH = BUNDLED_PATH.with_name("bundled-motion.safetensors")   # fits bundled.safetensors' UNet
