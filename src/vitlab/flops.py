"""FLOP counting: torch's ``FlopCounterMode``, taught the CPU's fused attention kernel and counting
model FLOPs for every fused attention backward.

torch's counter has formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN) but not
for ``_scaled_dot_product_flash_attention_for_cpu`` and its backward, so on a CPU every model that
runs torch's fused SDPA (timm's ViT, vitlab's kernels in fp32) would count no attention at all. The
CPU kernel does the same work as the CUDA flash kernel, so it is counted with torch's own SDPA
formulas.

torch's backward formula for the fused kernels also counts the recomputation of the scores (the
kernels keep only the log-sum-exp from the forward): hardware FLOPs, 10 N^2 d against the 8 N^2 d a
written-out attention's backward does. MFU is conventionally on model FLOPs, the same for every
route (PaLM's definition), and a table that mixes the two routes (on a CPU in fp32, PoPE and
differential attention write the attention out, the others fuse it) would otherwise compare unlike
counts; so every fused backward is counted without the recomputation: twice its forward."""
from __future__ import annotations

import torch
from torch.utils import flop_counter as fc

aten = torch.ops.aten


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Model FLOPs of a fused attention backward: dV, dP, dQ and dK, each as large as one of the
    forward's two products; not the scores' recomputation."""
    b, h, s_q, d = query_shape
    recompute = fc.bmm_flop((b * h, s_q, d), (b * h, d, key_shape[2]))
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape) - recompute


#: (op: formula) for ``FlopCounterMode(custom_mapping=...)``; the fused backwards' args all begin
#: with (grad_out, query, key, value), as torch's own registration for them reads them
FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
            aten._scaled_dot_product_flash_attention_backward: _sdpa_backward,
            aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward,
            aten._scaled_dot_product_cudnn_attention_backward: _sdpa_backward}


def flop_counter() -> fc.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU's fused attention kernel, and counts
    every fused attention backward in model FLOPs."""
    return fc.FlopCounterMode(display=False, custom_mapping=FORMULAS)
