"""Rankwise core: pure torch + safetensors + numpy. Never imports ComfyUI."""
