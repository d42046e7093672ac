"""Files that ship with the package: the bundled model."""

from pathlib import Path

BUNDLED_PATH = Path(__file__).resolve().parent / "bundled.safetensors"
