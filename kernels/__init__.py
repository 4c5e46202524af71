"""Pallas kernels, each beside the plain-JAX reference it is tested against."""

from kernels.attention import flash_attention, reference_attention

__all__ = ["flash_attention", "reference_attention"]
