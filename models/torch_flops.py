"""Counting PyTorch models in the paper's convention (forward multiply-accumulates), with fvcore.

fvcore already counts one flop per multiply-add for linear, addmm and convolutions. It needs help to match the
convention of models/flops.py exactly:
- scaled_dot_product_attention (what current attention code calls) is not counted by fvcore at all;
- its einsum handle rounds to 4 significant figures (it parses numpy's printed einsum_path), and its matmul handle
  miscounts when only the right operand has batch dimensions;
- by default it counts LayerNorm/GroupNorm/BatchNorm, upsampling and pooling, which the convention ignores.
Needs the `torch` extra: pip install 'dit-scaling[torch]'.
"""

from __future__ import annotations

import math
import re
import warnings

from models.flops import MacCount


def _shape(value) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(value)
    if shape is None:
        raise ValueError("fvcore could not read a tensor shape while counting; pass concrete example inputs.")
    return list(shape)


def _matmul_macs(inputs, outputs) -> int:
    # Every output element of a (broadcast, batched) matmul sums over the shared dimension.
    return math.prod(_shape(outputs[0])) * _shape(inputs[0])[-1]


def _sdpa_macs(inputs, outputs) -> int:
    q, k, v = (_shape(inputs[i]) for i in range(3))  # [..., Lq, E], [..., Lk, E], [..., Lk, Ev]
    batch_heads = math.prod(q[:-2])
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])  # q k^T and attention @ v


def _einsum_macs(inputs, outputs) -> int:
    equation = inputs[0].toIValue()
    operands = [_shape(v) for v in inputs[1].node().inputs()]
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    if len(lhs) == 1:
        return 0  # a permutation or reduction: no products
    if len(lhs) != 2 or "..." in equation:
        raise ValueError(f"Counting einsum {equation!r} is supported for two explicit operands only.")
    sizes = {}
    for labels, shape in zip(lhs, operands, strict=True):
        for label, size in zip(re.findall(r"[A-Za-z]", labels), shape, strict=True):
            sizes[label] = max(sizes.get(label, 1), size)
    return math.prod(sizes.values())  # one product per combination of all indices of a pairwise contraction


def count_torch_macs(model, inputs: tuple) -> tuple[MacCount, dict[str, int]]:
    """Forward MACs of model(*inputs) and the operators fvcore met but did not count (elementwise work).

    The count covers the whole batch in `inputs`; divide by the batch size for per-image Gflops.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fvcore's own import-time torch.jit.script use
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import addmm_flop_jit, conv_flop_jit, linear_flop_jit

    analysis = FlopCountAnalysis(model, inputs)
    # Only products are counted: replace fvcore's defaults, which also count norms, pooling and upsampling.
    analysis.clear_op_handles().set_op_handle(
        "aten::linear", linear_flop_jit, "aten::addmm", addmm_flop_jit, "aten::_convolution", conv_flop_jit,
        "aten::matmul", _matmul_macs, "aten::mm", _matmul_macs, "aten::bmm", _matmul_macs,
        "aten::einsum", _einsum_macs, "aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        by_operator = {name: int(v) for name, v in analysis.by_operator().items() if v}
        total = int(analysis.total())
    return MacCount(total=total, by_primitive=by_operator), dict(analysis.unsupported_ops())


def count_torch_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
