"""Fused multi-head attention: Triton kernels (forward and backward) and their plain reference."""
from fastvlp.ops.fmha.dispatch import BackendChoice, attention, select_backend
from fastvlp.ops.fmha.reference import attention_reference

__all__ = ["BackendChoice", "attention", "attention_reference", "select_backend"]
