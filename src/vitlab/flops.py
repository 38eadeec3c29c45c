"""FLOP counting: torch's ``FlopCounterMode``, taught the CPU's fused attention kernel.

torch's counter has formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN) but not
for ``_scaled_dot_product_flash_attention_for_cpu`` and its backward, so on a CPU every model that
runs torch's fused SDPA (timm's ViT, vitlab's kernels in fp32) would count no attention at all. The
CPU kernel does the same work as the CUDA flash kernel (its backward recomputes the scores from the
saved log-sum-exp), so it is counted with torch's own SDPA formulas."""
from __future__ import annotations

import torch
from torch.utils import flop_counter as fc

aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


def flop_counter() -> fc.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU's fused attention kernel."""
    return fc.FlopCounterMode(display=False, custom_mapping=CPU_SDPA)
