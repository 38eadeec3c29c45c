"""PoPE's fast path against the arithmetic it replaces.

The model runs PoPE's polar map as :class:`PolarEmbed` (ln2 folded into the tables, softplus through
exp2/log2) and attention with q/k wider than v as :class:`_SoftmaxAttention` (hand-written
backward). Both must equal the reference forms (:class:`PolarProject`, the written-out
``softmax(scale q k^T) v`` under autograd) in value and gradient; speed is measured by
``vitlab bench``, never asserted here.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import QK_PES
from vitlab.models import kernels
from vitlab.models.kernels import _SoftmaxAttention, scaled_scores, sdpa
from vitlab.models.pope import ClampInward, PolarEmbed, PolarProject
from vitlab.models.positions import make_grid, pad_prefix

LN2 = math.log(2.0)


def reference_pope(pe, q, k, grid):
    """PoPE's q/k transform as it was written before the fast path: PolarProject with cos/sin tables."""
    phi = pe.phases(grid)
    delta = ClampInward.apply(pe.delta.float(), -2 * math.pi, 0.0)
    phi_q = pad_prefix(phi, grid.num_prefix)
    phi_k = pad_prefix(phi + delta, grid.num_prefix)
    return (PolarProject.apply(q.float(), phi_q.cos(), phi_q.sin()),
            PolarProject.apply(k.float(), phi_k.cos(), phi_k.sin()))


def written_out(q, k, v, scale):
    return scaled_scores(q, k, scale).softmax(dim=-1) @ v.to(q.dtype)


def qkv_views(b, h, n, d, dtype=torch.float32, wide=True):
    """q, k (twice as wide when ``wide``) and v as the strided views the attention module hands over."""
    dq = 2 * d if wide else d
    qkv = torch.randn(b, n, h, 2 * dq + d, dtype=dtype)
    q, k, v = qkv.split([dq, dq, d], dim=-1)
    return [t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]


# ------------------------------------------------------------------------------------------------
# the polar map


@pytest.mark.parametrize("tshape", [(2, 5, 4), (2, 3, 5, 4), (2, 1, 5, 4)])
def test_polar_embed_gradcheck(tshape):
    """Shared tables (queries), per-head tables (keys, which carry delta) and a broadcast head dim."""
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 3, 5, 4, dtype=torch.float64)).requires_grad_()
    tab = torch.randn(*tshape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(PolarEmbed.apply, (x, tab))


def test_polar_embed_equals_polar_project_on_a_wide_range():
    """Same values and gradients as the reference map, from softplus' flat tail to its linear regime
    (|x| up to 100: the exp2 clamp at x = 44.4 must not show)."""
    torch.manual_seed(1)
    x = torch.cat([4 * torch.randn(2, 3, 7, 6), torch.linspace(-100, 100, 2 * 3 * 1 * 6).view(2, 3, 1, 6)], dim=2)
    angles = torch.randn(3, 8, 6)
    for shared in (True, False):
        a = angles[0] if shared else angles
        cos, sin = a.cos().requires_grad_(), a.sin().requires_grad_()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = PolarProject.apply(x1, cos, sin)
        fast = PolarEmbed.apply(x2, torch.stack([cos, sin]) * LN2)
        torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)
        g = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (x1, cos, sin), g)
        fast_grads = torch.autograd.grad(fast, (x2, cos, sin), g)
        for got, want in zip(fast_grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    magnitude = torch.hypot(fast[..., :6], fast[..., 6:]).detach()  # cos^2 + sin^2 = 1
    torch.testing.assert_close(magnitude, F.softplus(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_pope_equals_the_reference_path(ndim, num_prefix):
    """The module's output and its gradients (q, k, delta through the clamp) match PolarProject's path."""
    torch.manual_seed(2)
    d, heads = {2: 16, 3: 12}[ndim], 2
    pe = QK_PES.build("pope", None, head_dim=d, num_heads=heads, ndim=ndim)
    with torch.no_grad():
        pe.delta.uniform_(-8.0, 2.0)  # some entries outside [-2 pi, 0]: the clamp's inward gradient
    grid = make_grid((3, 4) if ndim == 2 else (2, 3, 2), num_prefix)
    q, k = (3 * torch.randn(2, 2, heads, grid.num_tokens, d)).unbind(0)
    q1, k1, q2, k2 = (t.clone().requires_grad_() for t in (q, k, q, k))
    fq, fk = pe(q1, k1, grid)
    rq, rk = reference_pope(pe, q2, k2, grid)
    torch.testing.assert_close(fq, rq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fk, rk, rtol=1e-6, atol=1e-6)
    gq, gk = torch.randn_like(fq), torch.randn_like(fk)
    fast = torch.autograd.grad((fq, fk), (q1, k1, pe.delta), (gq, gk))
    ref = torch.autograd.grad((rq, rk), (q2, k2, pe.delta), (gq, gk))
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fast[2].abs().max() > 1e-3  # delta does learn


def test_pope_query_tables_are_built_once_per_grid_and_survive_inference_mode():
    """The query tables are cached on the grid; built first under inference_mode they must still be
    usable (saved for backward) when the model trains afterwards."""
    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=4, dim=32, depth=2, heads=2,
                                qk_pe="pope")
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        model(x)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    pes = [blk.attn.qk_pe for blk in model.blocks]
    grid = make_grid((4, 4), 1)
    with torch.inference_mode():
        table = pes[0].query_tables(grid)
    assert not table.is_inference() and pes[1].query_tables(grid) is table  # one table for every layer


def test_pope_under_compile_is_the_same_arithmetic(monkeypatch):
    """Under torch.compile PoPE's polar transform is one plain expression (the compiler fuses it); it
    must give what the hand-written function gives."""
    torch.manual_seed(3)
    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=4, dim=32, depth=1, heads=2,
                                qk_pe="pope")
    with torch.no_grad():
        model.blocks[0].attn.qk_pe.delta.uniform_(-2 * math.pi, 0.0)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    grads = torch.autograd.grad(out.pow(2).sum(), list(model.parameters()))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = model(x)
    traced_grads = torch.autograd.grad(traced.pow(2).sum(), list(model.parameters()))
    torch.testing.assert_close(traced, out, rtol=1e-5, atol=1e-6)
    for got, want in zip(traced_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# attention with q/k wider than v


@pytest.mark.parametrize("dq,dv", [(8, 4), (4, 8), (6, 6)])
def test_softmax_attention_gradcheck(dq, dv):
    """q/k wider than v (PoPE), narrower (differential's values), equal; more keys than queries."""
    torch.manual_seed(4)
    q = torch.randn(2, 3, 5, dq, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 6, dq, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 6, dv, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: _SoftmaxAttention.apply(a, b, c, 0.37), (q, k, v))


def test_softmax_attention_equals_written_out():
    """On the strided q/k/v views the attention module hands over, at PoPE's shape (65 tokens)."""
    torch.manual_seed(5)
    q, k, v = qkv_views(3, 4, 65, 16)
    scale = 16 ** -0.5
    fast = _SoftmaxAttention.apply(q, k, v, scale)
    g = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, (q, k, v), g)
    ref = written_out(q, k, v, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(fast_grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_softmax_attention_under_bf16_autocast_matches_written_out():
    torch.manual_seed(6)
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv_views(2, 2, 17, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _SoftmaxAttention.apply(q, k, v, 8 ** -0.5)
        ref = written_out(q, k, v, 8 ** -0.5)
    assert fast.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn_like(fast)
    for got, want in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


def test_sdpa_routes_only_mismatched_widths_without_dropout_to_it(monkeypatch):
    calls = []
    real = _SoftmaxAttention.apply
    monkeypatch.setattr(_SoftmaxAttention, "apply", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv_views(2, 2, 9, 8)
    sdpa(q, k, v, 0.3, 0.0, True)
    assert calls == [1]  # PoPE on CPU, fp32
    sdpa(q, k, v, 0.3, 0.1, False)
    assert calls == [1, 1]  # dropout off outside training
    sdpa(q, k, v, 0.3, 0.1, True)
    assert calls == [1, 1]  # attention dropout: the written-out path applies it
    qn, kn, vn = (t.detach().bfloat16() for t in qkv_views(2, 2, 9, 8, wide=False))
    sdpa(qn, kn, vn, 0.3, 0.0, True)
    assert calls == [1, 1]  # equal widths keep their route
    assert not kernels.fused_route("cpu", torch.float32, 16, 8)


@pytest.mark.parametrize("attn", ["standard", "differential"])
def test_pope_model_gradients_match_the_reference_paths(attn, monkeypatch):
    """A whole model, fast paths against the reference ones (PolarProject + written-out attention)."""
    torch.manual_seed(7)
    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=4, dim=32, depth=2, heads=2,
                                qk_pe="pope", attn=attn)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qk_pe.delta.uniform_(-2 * math.pi, 0.0)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    out = model(x)
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))

    from vitlab.models.pope import PoPE
    monkeypatch.setattr(PoPE, "forward", reference_pope)
    monkeypatch.setattr(kernels, "sdpa", lambda q, k, v, scale, dropout, training: written_out(q, k, v, scale))
    ref = model(x)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref, y), list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_pope_compiles_to_one_graph():
    """Under torch.compile PoPE takes its plain-expression branch: no graph breaks (PolarProject's
    out= writes into views broke the graph at every q and k)."""
    import torch._dynamo

    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=4, dim=64, depth=2, heads=2,
                                qk_pe="pope")
    torch._dynamo.reset()
    report = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16))
    assert report.graph_break_count == 0, report.break_reasons


def test_compiled_pope_equals_eager():
    """torch.compile'd PoPE (dynamo + AOTAutograd, aot_eager: no C++ compiler needed) traces the polar
    expression and vitlab's own attention function for the twice-wide q/k: same outputs and gradients
    as eager."""
    import torch._dynamo

    torch.manual_seed(5)
    model = vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=4, dim=32, depth=2, heads=2,
                                qk_pe="pope")
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 3])
    ref = model(x)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref, y), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    out = compiled(x)
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
