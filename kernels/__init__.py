"""Triton kernels (fused attention, fused group-norm) and their PyTorch references."""
