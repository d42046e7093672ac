"""sfumato: Stable Diffusion in PyTorch."""
