"""Backends of the core losses: ``torch_*`` (pure PyTorch, any device) and ``triton_*`` (fused kernels)."""
