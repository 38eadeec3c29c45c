"""Invalid configurations raise a ValueError naming the value and what would be valid, before
any computation."""
import pytest
import torch

import vitlab

BASE = dict(img_size=16, patch_size=4, dim=48, depth=1, heads=4)

CASES = [
    (dict(qk_pe="ropee"), ["'ropee'", "rope_axial", "pope"]),
    (dict(token_pe="learnt"), ["'learnt'", "learned", "sincos"]),
    (dict(attn="flash"), ["'flash'", "standard", "differential"]),
    (dict(dim=50), ["dim=50", "heads=4"]),
    (dict(img_size=18), ["not divisible", "patch_size"]),
    (dict(qk_pe="rope_axial", dim=40, heads=4), ["head_dim", "10"]),  # head_dim 10: pairs don't split over 2 axes
    (dict(qk_pe="rope_mixed", dim=24, heads=4), ["head_dim", "6"]),
    (dict(qk_pe="rope_axial", img_size=(8, 8, 8), patch_size=4, dim=32, heads=4), ["head_dim", "3 axes"]),
    (dict(qk_pe="pope", img_size=(8, 8, 8), patch_size=4, dim=32, heads=4), ["pope", "head_dim"]),
    (dict(token_pe="learned3d"), ["learned3d", "3D"]),
    (dict(token_pe="learned3d", img_size=(8, 8, 8), patch_size=4, dim=32, heads=4), ["learned3d", "divisible by 3"]),
    (dict(token_pe="sincos", dim=40, heads=4, img_size=(8, 8, 8), patch_size=4), ["sincos", "6", "dim=40"]),
    (dict(attn="differential", heads=3, dim=48), ["even", "heads=3"]),
    (dict(attn="suppression", attn_kwargs={"kernel_size": 2}), ["kernel_size", "odd"]),
    (dict(qk_pe="string_cayley", qk_pe_kwargs={"sparsity": 0}), ["sparsity", "(0, 1]"]),
    (dict(qk_pe="string_reflection", qk_pe_kwargs={"reflections": 0}), ["reflections"]),
    (dict(qk_pe="string_reflection", qk_pe_kwargs={"reflections": 2.5}), ["reflections", "whole number", "2.5"]),
    (dict(qk_pe="rope_axial", qk_pe_kwargs={"thetaa": 5}), ["thetaa", "theta"]),
    (dict(qk_pe="rope_axial", qk_pe_kwargs={"axis_pairs": (1, 2)}), ["axis_pairs"]),
    (dict(patch_size=(4, 4, 2)), ["patch_size", "axes"]),
    (dict(pool="cls", num_cls=0), ["num_cls"]),
    (dict(pool="max"), ["pool", "cls", "mean"]),
    (dict(mlp_ratio=-1), ["mlp_ratio"]),
    (dict(mlp_ratio=1e308), ["mlp_ratio", "hidden units"]),  # was an OverflowError
    (dict(attn="eager", attn_kwargs={"check": "maybe"}), ["check", "true or false"]),
    (dict(depth=0), ["depth"]),
    (dict(colour=True), ["colour", "unknown key"]),
]


@pytest.mark.parametrize("kwargs,words", CASES, ids=[str(c[0]) for c in CASES])
def test_invalid_config_raises_value_error(kwargs, words):
    with pytest.raises(ValueError) as err:
        vitlab.create_model(**{**BASE, **kwargs})
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_unknown_size_lists_sizes():
    with pytest.raises(ValueError, match="unknown size 'huge'.*tiny"):
        vitlab.create_model(size="huge")


@pytest.mark.parametrize("shape,words", [
    ((2, 3, 16), ["images (B, C, H, W)", "(2, 3, 16)"]),
    ((2, 1, 16, 16), ["3 channel", "got 1"]),
    ((2, 3, 18, 16), ["not divisible"]),
    ((2, 3, 16, 16, 4), ["images (B, C, H, W)"]),  # a volume given to a 2D model
])
def test_bad_input_tensor(shape, words):
    m = vitlab.create_model(**BASE)
    with pytest.raises(ValueError) as err:
        m(torch.randn(*shape))
    for w in words:
        assert w in str(err.value)
