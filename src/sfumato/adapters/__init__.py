"""Adapters that change a loaded model: LoRA-family weight patches (``lora``)."""

from .lora import LoraFileReport, LoraReport, apply_loras, find_lora, parse_lora_prompt, remove_loras

__all__ = ["LoraFileReport", "LoraReport", "apply_loras", "find_lora", "parse_lora_prompt", "remove_loras"]
