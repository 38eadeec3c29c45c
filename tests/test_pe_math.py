"""The math of the positional encodings and attention kernels, not just their shapes.

Every check compares vitlab against an independent computation (a closed form written out here in
float64, a hand-built tensor, or timm's implementation of the same thing) and every check can fail.
The exact contract is DESIGN.md section 3.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import KERNELS, QK_PES, TOKEN_PES
from vitlab.models.attention import Attention
from vitlab.models.kernels import raster_diff
from vitlab.models.positions import make_grid, pad_prefix
from vitlab.models.token_pe import sincos_table

RELATIVE = ["rope_axial", "rope_mixed", "pope", "string_cayley", "string_reflection"]
ROTATIONS = ["rope_axial", "rope_mixed", "string_cayley", "string_reflection"]
SHAPE = {2: (3, 4), 3: (2, 3, 3)}  # non-square / non-cubic on purpose: x, y, z must not be confused
HEAD_DIM = {2: 16, 3: 12}  # divisible by 2 * ndim (RoPE pairs per axis) and by ndim (PoPE)
HEADS = 2


# ------------------------------------------------------------------------------------------------
# helpers


def build_pe(name, ndim, options=None, heads=HEADS, head_dim=None, layer=0, depth=1):
    d = head_dim or HEAD_DIM[ndim]
    return QK_PES.build(name, options, head_dim=d, num_heads=heads, ndim=ndim, layer=layer, depth=depth)


@torch.no_grad()
def randomize_pe(pe):
    """Move the learned parameters away from their identity-like initialisation."""
    if hasattr(pe, "a"):  # STRING-Cayley: P != I
        pe.a.normal_(0.0, 0.5)
    if hasattr(pe, "delta"):  # PoPE: a non-zero key phase bias, inside its range [-2 pi, 0]
        pe.delta.uniform_(-2 * math.pi, 0.0)
    return pe


def apply_full(pe, q, k, grid):
    """The whole q/k transform: the position-independent basis (STRING's P), then the PE."""
    basis = pe.basis()
    if basis is not None:
        q = torch.einsum("hij,bhnj->bhni", basis.to(q.dtype), q)
        k = torch.einsum("hij,bhnj->bhni", basis.to(k.dtype), k)
    return pe(q, k, grid)


def shift_pairs(grid, axis):
    """Patch indices (src, dst) with coords(dst) = coords(src) + e_axis, both inside the grid."""
    coords = grid.coords.long().tolist()
    where = {tuple(c): i for i, c in enumerate(coords)}
    src, dst = [], []
    for i, c in enumerate(coords):
        moved = list(c)
        moved[axis] += 1
        if tuple(moved) in where:
            src.append(i)
            dst.append(where[tuple(moved)])
    return torch.tensor(src), torch.tensor(dst)


def shifted_content(x, src, dst, num_prefix):
    """A fresh random (B, H, N, C) tensor in which token p + e carries x's content of token p."""
    out = torch.randn_like(x)
    out[..., num_prefix + dst, :] = x[..., num_prefix + src, :]
    return out


def submatrix(a, rows, cols):
    return a[..., rows, :][..., cols]


def tiny_model(seed=0, **kw):
    base = dict(img_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=5)
    base.update(kw)
    torch.manual_seed(seed)
    return vitlab.create_model(**base).eval()


@torch.no_grad()
def randomize_model_pes(model):
    for blk in model.blocks:
        randomize_pe(blk.attn.qk_pe)
    return model


def rope_by_hand(x, angles):
    """Half-layout rotation in float64, written out pair by pair: pair j = channels (j, j + d/2)."""
    x = x.double()
    d = x.shape[-1]
    out = x.clone()
    for j in range(d // 2):
        c, s = torch.cos(angles[..., j]), torch.sin(angles[..., j])
        out[..., j] = x[..., j] * c - x[..., j + d // 2] * s
        out[..., j + d // 2] = x[..., j + d // 2] * c + x[..., j] * s
    return out


# ------------------------------------------------------------------------------------------------
# 1. relative-position invariance


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", RELATIVE)
def test_relative_pes_give_shift_invariant_logits(name, ndim):
    torch.manual_seed(1)
    pe = randomize_pe(build_pe(name, ndim))
    if name == "string_cayley":
        eye = torch.eye(HEAD_DIM[ndim])
        assert (pe.basis() - eye).abs().max() > 0.1, "P should differ from I for this test"
    num_prefix = 1
    grid = make_grid(SHAPE[ndim], num_prefix)
    n, d = grid.num_tokens, HEAD_DIM[ndim]
    q, k = torch.randn(2, 1, HEADS, n, d).unbind(0)
    q1, k1 = apply_full(pe, q, k, grid)
    logits = q1 @ k1.transpose(-2, -1)  # (1, H, N, N); PoPE: different q and k transforms
    for axis in range(ndim):
        src, dst = shift_pairs(grid, axis)
        assert len(src) > 2
        qs, ks = shifted_content(q, src, dst, num_prefix), shifted_content(k, src, dst, num_prefix)
        q2, k2 = apply_full(pe, qs, ks, grid)
        shifted = q2 @ k2.transpose(-2, -1)
        a = submatrix(logits, num_prefix + src, num_prefix + src)
        b = submatrix(shifted, num_prefix + dst, num_prefix + dst)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"{name} {ndim}D: shift along axis {axis}")
        # The PE is not trivially the identity: the shifted tokens' own vectors did change.
        assert (q2[..., num_prefix + dst, :] - q1[..., num_prefix + src, :]).abs().max() > 1e-2


@pytest.mark.parametrize("ndim", [2, 3])
def test_learned_token_pe_is_not_shift_invariant(ndim):
    """Negative control: the same check with an absolute (learned) token PE must fail."""
    torch.manual_seed(2)
    dim, num_prefix = 16, 1
    grid = make_grid(SHAPE[ndim], num_prefix)
    pe = TOKEN_PES.build("learned", None, dim=dim, grid_shape=SHAPE[ndim], num_prefix=num_prefix)
    tokens = torch.randn(1, 1, grid.num_tokens, dim)  # (B, 1, N, C) so the helpers apply
    t1 = pe(tokens[:, 0], grid)
    logits = t1 @ t1.transpose(-2, -1)
    for axis in range(ndim):
        src, dst = shift_pairs(grid, axis)
        moved = shifted_content(tokens, src, dst, num_prefix)[:, 0]
        t2 = pe(moved, grid)
        shifted = t2 @ t2.transpose(-2, -1)
        diff = (submatrix(shifted, num_prefix + dst, num_prefix + dst)
                - submatrix(logits, num_prefix + src, num_prefix + src)).abs().max()
        assert diff > 1e-2, f"learned absolute PE looked shift-invariant along axis {axis} (diff {diff:.2e})"


# ------------------------------------------------------------------------------------------------
# 2. prefix tokens are never rotated


@pytest.mark.parametrize("name", ROTATIONS + ["pope"])
def test_prefix_tokens_are_not_rotated(name):
    torch.manual_seed(3)
    ndim, num_prefix = 2, 2
    pe = build_pe(name, ndim)
    if name == "string_cayley":
        torch.testing.assert_close(pe.basis(), torch.eye(HEAD_DIM[ndim]).expand(HEADS, -1, -1))
    if name == "pope":
        randomize_pe(pe)  # the key's phase bias must not reach prefix tokens either
    grid = make_grid(SHAPE[ndim], num_prefix)
    q, k = torch.randn(2, 2, HEADS, grid.num_tokens, HEAD_DIM[ndim]).unbind(0)
    q1, k1 = pe(q, k, grid)
    if name == "pope":
        zeros = torch.zeros_like(q[:, :, :num_prefix])
        torch.testing.assert_close(q1[:, :, :num_prefix], torch.cat([F.softplus(q[:, :, :num_prefix]), zeros], -1),
                                   rtol=0, atol=2e-6)
        torch.testing.assert_close(k1[:, :, :num_prefix], torch.cat([F.softplus(k[:, :, :num_prefix]), zeros], -1),
                                   rtol=0, atol=2e-6)
        assert k1[:, :, num_prefix + 1:, HEAD_DIM[ndim]:].abs().max() > 1e-2  # patches do get a phase
    else:
        torch.testing.assert_close(q1[:, :, :num_prefix], q[:, :, :num_prefix], rtol=0, atol=1e-7)
        torch.testing.assert_close(k1[:, :, :num_prefix], k[:, :, :num_prefix], rtol=0, atol=1e-7)
        assert (q1[:, :, num_prefix:] - q[:, :, num_prefix:]).abs().max() > 1e-2  # patches are rotated


# ------------------------------------------------------------------------------------------------
# 3. rotations preserve norms


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", ROTATIONS)
def test_rotations_preserve_norms(name, ndim):
    torch.manual_seed(4)
    pe = randomize_pe(build_pe(name, ndim))
    grid = make_grid(SHAPE[ndim], 1)
    q, k = torch.randn(2, 2, HEADS, grid.num_tokens, HEAD_DIM[ndim]).unbind(0)
    q1, k1 = apply_full(pe, q, k, grid)
    torch.testing.assert_close(q1.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert (q1 - q).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# 4. STRING


@pytest.mark.parametrize("name,options", [
    ("string_cayley", None),
    ("string_cayley", {"sparsity": 0.3}),
    ("string_reflection", None),
    ("string_reflection", {"reflections": 3}),
])
def test_string_basis_is_orthogonal_and_matches_its_definition(name, options):
    torch.manual_seed(5)
    d = 16
    pe = randomize_pe(build_pe(name, 2, options, heads=3, head_dim=d))
    p = pe.orthogonal()
    assert p.shape == (3, d, d)
    eye = torch.eye(d)
    torch.testing.assert_close(p @ p.transpose(-1, -2), eye.expand(3, -1, -1), rtol=0, atol=2e-5)
    assert (p - eye).abs().max() > 0.1
    # Independent float64 construction from the parameters.
    eye64 = torch.eye(d, dtype=torch.float64)
    ref = []
    for h in range(3):
        if name == "string_cayley":
            s = torch.zeros(d, d, dtype=torch.float64)
            s[pe.rows[h], pe.cols[h]] = pe.a[h].detach().double()
            s = s - s.T
            ref.append((eye64 - s) @ torch.linalg.inv(eye64 + s))
        else:
            m = eye64.clone()
            for v in pe.v[h].detach().double():
                m = m @ (eye64 - 2 * torch.outer(v, v) / v.dot(v))
            ref.append(m)
    torch.testing.assert_close(p.double(), torch.stack(ref), rtol=0, atol=2e-5)


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5])
def test_string_sparse_mask(sparsity):
    d, heads = 16, 3
    pairs = d * (d - 1) // 2
    keep = round(sparsity * pairs)
    pe = build_pe("string_cayley", 2, {"sparsity": sparsity, "sparsity_seed": 7}, heads=heads, head_dim=d)
    assert tuple(pe.a.shape) == (heads, keep)
    with torch.no_grad():
        pe.a.uniform_(0.5, 1.5)  # all non-zero
    s = pe.skew()
    torch.testing.assert_close(s, -s.transpose(-1, -2))
    upper = torch.triu(s, diagonal=1)
    for h in range(heads):
        assert int((upper[h] != 0).sum()) == keep, "mask entries must be distinct upper-triangle positions"
        assert int((torch.tril(s[h], diagonal=0) != 0).sum()) == keep
    same = build_pe("string_cayley", 2, {"sparsity": sparsity, "sparsity_seed": 7}, heads=heads, head_dim=d)
    assert torch.equal(same.rows, pe.rows) and torch.equal(same.cols, pe.cols)
    other = build_pe("string_cayley", 2, {"sparsity": sparsity, "sparsity_seed": 8}, heads=heads, head_dim=d)
    assert not (torch.equal(other.rows, pe.rows) and torch.equal(other.cols, pe.cols))
    dense = build_pe("string_cayley", 2, None, heads=heads, head_dim=d)
    assert tuple(dense.a.shape) == (heads, pairs)


def test_string_sparsity_mask_follows_the_run_seed():
    """The mask is part of the initialisation: a run draws it from train.seed unless
    sparsity_seed is given, and records the seed in its model config (eval and resume rebuild it)."""
    from vitlab.config import load_config
    from vitlab.train.build import build_model

    def mask(*overrides):
        cfg = load_config("fashion-mnist-quick", ["model.qk_pe=string_cayley", "model.qk_pe_kwargs.sparsity=0.3",
                                                  *overrides])
        model, mcfg = build_model(cfg, in_chans=1, num_classes=10, img_size=(28, 28))
        return torch.stack([blk.attn.qk_pe.rows * 1000 + blk.attn.qk_pe.cols for blk in model.blocks]), mcfg

    one, mcfg = mask("train.seed=1")
    assert mcfg["qk_pe_kwargs"] == {"sparsity": 0.3, "sparsity_seed": 1}
    assert torch.equal(mask("train.seed=1")[0], one)
    assert not torch.equal(mask("train.seed=2")[0], one)
    fixed, mcfg = mask("train.seed=2", "model.qk_pe_kwargs.sparsity_seed=1")
    assert torch.equal(fixed, one) and mcfg["qk_pe_kwargs"]["sparsity_seed"] == 1


def test_string_sparsity_mask_is_saved_with_the_weights():
    """A checkpoint holds the mask its entries of S belong to: loaded into a model built with another
    sparsity_seed (from config.yaml's model keys alone, which do not hold the run's seed) it gives the
    trained model, where it gave another one without a word. One saved before the mask was keeps the
    model's own mask."""
    def string(seed):
        torch.manual_seed(0)
        return vitlab.create_model(img_size=16, patch_size=4, in_chans=3, num_classes=5, dim=32, depth=2, heads=2,
                                   qk_pe="string_cayley", qk_pe_kwargs={"sparsity": 0.3, "sparsity_seed": seed})

    trained, other = string(1), string(2)
    randomize_model_pes(trained)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (trained(x) - other(x)).abs().max() > 1e-4
        other.load_state_dict(trained.state_dict())
        assert torch.equal(other(x), trained(x))
        old = {k: v for k, v in trained.state_dict().items() if not k.endswith((".rows", ".cols"))}
        again = string(1)
        again.load_state_dict(old)  # strict: the missing mask is the model's own
        assert torch.equal(again(x), trained(x))


def test_string_cayley_model_at_init_equals_rope_axial_model():
    rope = tiny_model(seed=0, qk_pe="rope_axial")
    string = tiny_model(seed=0, qk_pe="string_cayley")
    missing, unexpected = string.load_state_dict(rope.state_dict(), strict=False)
    assert set(missing) == {f"blocks.{i}.attn.qk_pe.{k}" for i in range(2) for k in ("a", "rows", "cols")}
    assert not unexpected
    torch.manual_seed(6)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(string(x), rope(x), rtol=1e-5, atol=1e-5)
        # P != I changes the model ...
        randomize_model_pes(string)
        moved = string(x)
        assert (moved - rope(x)).abs().max() > 1e-4
        # ... and folding P into the q/k weights turns it into plain RoPE-Axial on those weights.
        assert vitlab.fold_string(string) == 2
        torch.testing.assert_close(string(x), moved, rtol=1e-4, atol=1e-5)
        assert all(type(blk.attn.qk_pe).__name__ == "RopeAxial" for blk in string.blocks)
        rope.load_state_dict(string.state_dict())  # strict: the folded model is a rope_axial model
        torch.testing.assert_close(rope(x), moved, rtol=1e-4, atol=1e-5)
        # a folded state dict cannot be loaded where P would be applied a second time
        with pytest.raises(RuntimeError, match="qk_pe.a"):
            tiny_model(seed=0, qk_pe="string_cayley").load_state_dict(string.state_dict())


@pytest.mark.parametrize("name", ["string_cayley", "string_reflection"])
def test_string_prefix_tokens_get_p_but_no_rotation(name):
    """Prefix tokens get STRING's formula at position 0: P q, unrotated (the fold applies P to every
    token, which is what makes folding P into the q/k weights exact)."""
    torch.manual_seed(4)
    model = tiny_model(seed=0, qk_pe=name, num_cls=2).eval()
    randomize_model_pes(model)
    attn = model.blocks[0].attn
    seen = {}
    attn.qk_pe.register_forward_hook(lambda mod, args, out: seen.update(inp=args[:2], out=out))
    x = torch.randn(2, 3, 16, 16)
    tokens = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: tokens.update(x=args[0]))
    with torch.no_grad():
        model(x)
        b, n, c = tokens["x"].shape
        raw = attn.qkv(model.blocks[0].norm1(tokens["x"])).view(b, n, 3, attn.num_heads, attn.head_dim)
        raw = raw.permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        p = attn.qk_pe.orthogonal()  # (H, d, d)
        assert (p - torch.eye(attn.head_dim)).abs().max() > 1e-2
        for i in range(2):  # q, k
            expect = raw[i, :, :, :2] @ p.transpose(-1, -2)  # P q for each prefix row
            torch.testing.assert_close(seen["inp"][i][:, :, :2], expect, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(seen["out"][i][:, :, :2], seen["inp"][i][:, :, :2], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# 5. rope_mixed with axial frequencies is rope_axial


@pytest.mark.parametrize("ndim", [2, 3])
def test_rope_mixed_with_axial_frequencies_equals_rope_axial(ndim):
    torch.manual_seed(8)
    axial = build_pe("rope_axial", ndim, {"theta": 100.0})
    mixed = build_pe("rope_mixed", ndim, {"theta": 100.0})
    grid = make_grid(SHAPE[ndim], 1)
    q, k = torch.randn(2, 2, HEADS, grid.num_tokens, HEAD_DIM[ndim]).unbind(0)
    qa, ka = axial(q, k, grid)
    qm, km = mixed(q, k, grid)
    assert (qm - qa).abs().max() > 1e-2  # random mixed initialisation is not axial
    with torch.no_grad():
        mixed.freqs.data[:] = axial.freqs
    qm, km = mixed(q, k, grid)
    torch.testing.assert_close(qm, qa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(km, ka, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 6. PoPE closed form


def pope_reference(q, k, coords, delta, num_prefix, base):
    """sum_c m_q m_k cos(phi_q,c - phi_k,c - delta_c), float64, straight from DESIGN section 3: channels
    split in contiguous blocks per axis (x, y[, z]); within an axis of n channels theta_i = base^(-i/n).
    Prefix tokens have phase 0 and no bias."""
    d, ndim = q.shape[-1], coords.shape[-1]
    n = d // ndim
    theta = torch.tensor([base ** (-(c % n) / n) for c in range(d)], dtype=torch.float64)
    axis = torch.tensor([c // n for c in range(d)])
    phase = coords.double()[:, axis] * theta  # (N_patch, d)
    phase = torch.cat([torch.zeros(num_prefix, d, dtype=torch.float64), phase])  # (N, d)
    heads, n_tok = q.shape[1], phase.shape[0]
    dk = delta.double().reshape(heads, 1, d).expand(heads, n_tok, d).clone()
    dk[:, :num_prefix] = 0.0
    mq, mk = F.softplus(q.double()), F.softplus(k.double())
    angle = phase[None, :, None, :] - phase[None, None, :, :] - dk[:, None, :, :]  # (H, Nq, Nk, d)
    return torch.einsum("bhic,bhjc,hijc->bhij", mq, mk, torch.cos(angle))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("options,base", [(None, 100.0), ({"base": 1000.0}, 1000.0)])
def test_pope_score_equals_closed_form(ndim, options, base):
    torch.manual_seed(9)
    pe = randomize_pe(build_pe("pope", ndim, options))
    num_prefix = 1
    grid = make_grid(SHAPE[ndim], num_prefix)
    q, k = torch.randn(2, 2, HEADS, grid.num_tokens, HEAD_DIM[ndim]).unbind(0)
    q1, k1 = pe(q, k, grid)
    assert q1.shape[-1] == 2 * HEAD_DIM[ndim]
    ref = pope_reference(q, k, grid.coords, pe.delta.detach(), num_prefix, base)
    torch.testing.assert_close((q1 @ k1.transpose(-2, -1)).double(), ref, rtol=1e-5, atol=1e-4)


def test_pope_phase_bias_is_clamped_to_its_range():
    torch.manual_seed(10)
    pe = build_pe("pope", 2)
    with torch.no_grad():
        pe.delta.uniform_(-12.0, 5.0)  # outside [-2 pi, 0] on both sides
    grid = make_grid(SHAPE[2], 1)
    q, k = torch.randn(2, 1, HEADS, grid.num_tokens, HEAD_DIM[2]).unbind(0)
    q1, k1 = pe(q, k, grid)
    clamped = pe.delta.detach().clamp(-2 * math.pi, 0.0)
    ref = pope_reference(q, k, grid.coords, clamped, 1, 100.0)
    torch.testing.assert_close((q1 @ k1.transpose(-2, -1)).double(), ref, rtol=1e-5, atol=1e-4)


def test_pope_phase_bias_learns_from_its_bound_and_does_not_drift_out_of_range():
    """delta starts at its bound 0: the gradient must reach it there (a plain clamp passes none). A
    gradient pushing it outward must not carry the stored value away while the used one sits at the
    bound (a straight-through clamp drifted to 3.0 in 300 Adam steps, then needed 318 steps the other
    way before the used value moved), and a gradient back inward must move it at once."""
    from vitlab.models.pope import ClampInward

    x = torch.tensor([-7.0, -2.0, 0.0, 1.0, 1.0, -7.0], requires_grad=True)
    ClampInward.apply(x, -2 * math.pi, 0.0).backward(torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0]))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, -1.0]  # outside: only the way back in passes

    torch.manual_seed(0)
    pe = QK_PES.build("pope", {}, head_dim=4, num_heads=1, ndim=2)
    grid = make_grid((1, 2), 0)
    q = k = torch.ones(1, 1, 2, 4)
    opt = torch.optim.Adam(pe.parameters(), lr=0.01)

    def step(sign):  # the score of the query at x=1 on the key at x=0; maximising it wants delta > 0
        opt.zero_grad()
        qq, kk = pe(q, k, grid)
        (sign * (qq @ kk.transpose(-1, -2))[0, 0, 1, 0]).backward()
        opt.step()

    step(-1.0)
    assert pe.delta.detach().abs().max() > 1e-3  # learns from the bound
    for _ in range(300):
        step(-1.0)
    assert pe.delta.max().item() < 0.2, pe.delta  # Adam's momentum carries it ~10 lr past the bound, no more
    for n in range(1, 40):
        step(1.0)
        if pe.delta.clamp(-2 * math.pi, 0.0).min().item() < 0:
            break
    assert n < 20, n  # back in range within a few steps


def test_pope_attention_uses_the_original_head_dim_scale():
    model = tiny_model(seed=0, qk_pe="pope", depth=1)
    randomize_model_pes(model)
    attn = model.blocks[0].attn
    head_dim = 32 // 2
    assert attn.scale == head_dim ** -0.5
    seen = {}
    attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], grid=args[1], out=out))
    torch.manual_seed(11)
    images = torch.randn(2, 3, 16, 16)
    maps = vitlab.attention_maps(model, images)
    x, grid = seen["x"], seen["grid"]
    b, n, c = x.shape
    with torch.no_grad():
        q, k, v = attn.qkv(x).view(b, n, 3, 2, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        qp, kp = attn.qk_pe(q, k, grid)
        probs = ((qp @ kp.transpose(-2, -1)) / math.sqrt(head_dim)).softmax(-1)
        out = attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(maps[0], probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["out"], out, rtol=1e-5, atol=1e-5)  # the fused (SDPA) path too
    wrong = ((qp @ kp.transpose(-2, -1)) / math.sqrt(2 * head_dim)).softmax(-1)
    assert (wrong - maps[0]).abs().max() > 1e-3  # the check above can tell the two scales apart


# ------------------------------------------------------------------------------------------------
# 7. eager == standard; attention maps


@pytest.mark.parametrize("qk", QK_PES.names())
def test_eager_kernel_equals_standard(qk):
    std = randomize_model_pes(tiny_model(seed=0, qk_pe=qk, attn="standard"))
    eager = tiny_model(seed=0, qk_pe=qk, attn="eager")
    eager.load_state_dict(std.state_dict())
    torch.manual_seed(12)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(eager(x), std(x), rtol=1e-5, atol=1e-5)
    maps_std, maps_eager = vitlab.attention_maps(std, x), vitlab.attention_maps(eager, x)
    n = 1 + 16
    assert len(maps_std) == 2
    for a, a_e in zip(maps_std, maps_eager):
        assert a.shape == (2, 2, n, n)
        assert a.min() >= 0
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, n), rtol=0, atol=1e-4)
        torch.testing.assert_close(a_e, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qk", ["none", "rope_axial", "pope"])
def test_differential_attention_maps(qk):
    model = randomize_model_pes(tiny_model(seed=0, qk_pe=qk, attn="differential", heads=4))
    torch.manual_seed(13)
    x = torch.randn(2, 3, 16, 16)
    maps = vitlab.attention_maps(model, x)
    n = 1 + 16
    assert len(maps) == 2
    for blk, a in zip(model.blocks, maps):
        assert a.shape == (2, 2, n, n)
        lam = blk.attn.kernel.lam().item()
        torch.testing.assert_close(a.sum(-1), torch.full((2, 2, n), 1 - lam), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["differential", "differential_entropy"])
@pytest.mark.parametrize("layer", [0, 3])
def test_differential_forward_matches_its_maps(name, layer):
    """The fused forward and the maps recorded by ``probs`` describe the same computation, and lambda
    follows the formula of DESIGN section 3 (layer counted from 1 there, from 0 in vitlab)."""
    torch.manual_seed(14)
    d, heads = 8, 4
    kern = KERNELS.build(name, None, head_dim=d, num_heads=heads, ndim=2, layer=layer, depth=4, attn_drop=0.0)
    with torch.no_grad():
        kern.sub_norm.weight.uniform_(0.5, 1.5)
    assert kern.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * ((layer + 1) - 1)))
    lq1, lk1, lq2, lk2 = (getattr(kern, f"lambda_{n}").detach() for n in ("q1", "k1", "q2", "k2"))
    lam = (math.exp(float(lq1 @ lk1)) - math.exp(float(lq2 @ lk2))
           + kern.lambda_init)
    assert kern.lam().item() == pytest.approx(lam, rel=1e-6)
    grid = make_grid((2, 3), 1)
    q, k, v = torch.randn(3, 2, heads, grid.num_tokens, d).unbind(0)
    scale = d ** -0.5
    a = kern.probs(q, k, scale, grid)
    p = (q @ k.transpose(-2, -1) * scale).softmax(-1)
    a1, a2 = p[:, 0::2], p[:, 1::2]
    if name == "differential":
        torch.testing.assert_close(a, a1 - lam * a2, rtol=1e-5, atol=1e-6)
    wide = torch.cat([v[:, 0::2], v[:, 1::2]], dim=-1)  # head h: channels of sub-heads 2h then 2h+1
    o = a @ wide
    ref = o / o.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * kern.sub_norm.weight * (1 - kern.lambda_init)
    torch.testing.assert_close(kern(q, k, v, scale, grid), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 8. against timm


def test_rope_mixed_matches_timm():
    from timm.layers.pos_embed_sincos import RotaryEmbeddingMixed, apply_rot_embed_cat

    heads, d, shape = 3, 16, (3, 5)
    torch.manual_seed(15)
    timm_rope = RotaryEmbeddingMixed(dim=heads * d, depth=1, num_heads=heads, temperature=10.0)
    torch.manual_seed(15)
    mine = build_pe("rope_mixed", 2, heads=heads, head_dim=d)
    # Same draws, same initialisation rule (DESIGN: "as in RoPE-Mixed").
    torch.testing.assert_close(mine.freqs.data, timm_rope.freqs.data[:, 0].permute(1, 0, 2))
    with torch.no_grad():
        timm_rope.freqs.normal_(0.0, 0.7)  # arbitrary learned frequencies
        mine.freqs[:, 0] = timm_rope.freqs[0, 0]
        mine.freqs[:, 1] = timm_rope.freqs[1, 0]
    grid = make_grid(shape, 0)
    q, k = torch.randn(2, 2, heads, grid.num_tokens, d).unbind(0)
    q1, _ = mine(q, k, grid)
    emb = timm_rope.get_embed(list(shape))  # (depth, heads, N, 2d), interleaved
    assert emb.shape == (1, heads, grid.num_tokens, 2 * d)
    to_inter = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], -1).flatten()  # inter c <- half
    to_half = torch.argsort(to_inter)
    q_timm = apply_rot_embed_cat(q[..., to_inter], emb[0])[..., to_half]
    torch.testing.assert_close(q1, q_timm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h_diff", [1, 2])
@pytest.mark.parametrize("layer", [0, 2])
def test_differential_matches_timm(h_diff, layer):
    from timm.layers.diff_attention import DiffAttention

    dim, depth, gh, gw = 32, 4, 2, 3
    torch.manual_seed(16)
    ref = DiffAttention(dim, num_heads=h_diff, qkv_bias=True, depth=layer).eval()
    hd = dim // h_diff // 2
    assert ref.head_dim == hd
    ctx = dict(head_dim=hd, num_heads=2 * h_diff, ndim=2, layer=layer, depth=depth)
    mine = Attention(dim, 2 * h_diff, qk_pe=QK_PES.build("none", None, **ctx),
                     kernel=KERNELS.build("differential", None, attn_drop=0.0, **ctx), qkv_bias=True).eval()
    assert mine.kernel.lambda_init == pytest.approx(ref.lambda_init)
    with torch.no_grad():
        ref.sub_norm.weight.uniform_(0.5, 1.5)
        ref.qkv.bias.normal_()
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            getattr(ref, name).normal_(0.0, 0.3)
            getattr(mine.kernel, name).copy_(getattr(ref, name))
        mine.qkv.load_state_dict(ref.qkv.state_dict())
        mine.proj.load_state_dict(ref.proj.state_dict())
        mine.kernel.sub_norm.weight.copy_(ref.sub_norm.weight)
        x = torch.randn(2, gh * gw, dim)
        torch.testing.assert_close(mine(x, make_grid((gh, gw), 0)), ref(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 9. differential_entropy


def test_differential_entropy_combine_formula():
    torch.manual_seed(17)
    kern = KERNELS.build("differential_entropy", None, head_dim=8, num_heads=4, ndim=2, layer=1, depth=2,
                         attn_drop=0.0)
    plain = KERNELS.build("differential", None, head_dim=8, num_heads=4, ndim=2, layer=1, depth=2, attn_drop=0.0)
    plain.load_state_dict(kern.state_dict())
    lam = kern.lam().item()
    b, h, n = 2, 2, 16
    a1 = torch.randn(b, h, n, n).softmax(-1)
    uniform = torch.full((b, h, n, n), 1.0 / n)  # h = 1
    torch.testing.assert_close(kern.combine(a1, uniform), a1 - 2 * lam * uniform, rtol=1e-6, atol=1e-6)
    onehot = F.one_hot(torch.randint(0, n, (b, h, n)), n).float()  # h = 0
    torch.testing.assert_close(kern.combine(a1, onehot), a1, rtol=0, atol=1e-6)
    half = torch.zeros(b, h, n, n)
    half[..., :4] = 0.25  # uniform over sqrt(N) keys: H = log 4 = (1/2) log 16, h = 1/2
    torch.testing.assert_close(kern.combine(a1, half), plain.combine(a1, half), rtol=1e-6, atol=1e-6)
    # General rows, entropy computed here in float64.
    a2 = (3 * torch.randn(b, h, n, n)).softmax(-1)
    ent = -(a2.double() * a2.double().log()).sum(-1, keepdim=True) / math.log(n)
    ref = a1.double() - 2 * ent * lam * a2.double()
    torch.testing.assert_close(kern.combine(a1, a2).double(), ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 10. suppression


def test_suppression_with_zero_conv_equals_standard_and_nonzero_differs():
    std = tiny_model(seed=0, qk_pe="rope_axial", attn="standard")
    with torch.no_grad():  # init q/k weights (std 0.02) give near-uniform attention: make the scores matter
        for blk in std.blocks:
            blk.attn.qkv.weight.normal_(0.0, 0.3)
    sup = tiny_model(seed=0, qk_pe="rope_axial", attn="suppression")
    missing, unexpected = sup.load_state_dict(std.state_dict(), strict=False)
    assert set(missing) == {f"blocks.{i}.attn.kernel.weight" for i in range(2)} and not unexpected
    torch.manual_seed(18)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sup(x), std(x), rtol=1e-5, atol=1e-5)
        sup.blocks[0].attn.kernel.weight[0, 0, 1, 2] = 0.7
        assert (sup(x) - std(x)).abs().max() > 1e-3


def test_suppression_scores_by_hand():
    torch.manual_seed(19)
    heads, d, num_prefix, shape = 2, 8, 2, (3, 4)
    kern = KERNELS.build("suppression", None, head_dim=d, num_heads=heads, ndim=2, layer=0, depth=1,
                         attn_drop=0.0)
    with torch.no_grad():
        kern.weight.normal_()
    grid = make_grid(shape, num_prefix)
    q, k = torch.randn(2, 1, heads, grid.num_tokens, d).unbind(0)
    scale = d ** -0.5
    s = kern.scores(q, k, scale, grid)
    plain = (q @ k.transpose(-2, -1)) * scale
    torch.testing.assert_close(s[..., :num_prefix], plain[..., :num_prefix], rtol=0, atol=1e-6)
    # Patch columns: minus the depthwise cross-correlation (zero padding) of each query's score map.
    gh, gw = shape
    w = kern.weight.detach().double()
    maps = plain[..., num_prefix:].double().reshape(1, heads, grid.num_tokens, gh, gw)
    surround = torch.zeros_like(maps)
    for r in range(gh):
        for c in range(gw):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= r + dr < gh and 0 <= c + dc < gw:
                        surround[..., r, c] += w[:, 0, dr + 1, dc + 1][:, None] * maps[..., r + dr, c + dc]
    ref = (maps - surround).reshape(1, heads, grid.num_tokens, gh * gw)
    torch.testing.assert_close(s[..., num_prefix:].double(), ref, rtol=1e-5, atol=1e-5)
    assert (s[..., num_prefix:] - plain[..., num_prefix:]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# 11. diffsim


def test_raster_diff_by_hand():
    vals = torch.tensor([10.0, 20.0, 1.0, 4.0, 9.0, 16.0, 25.0])  # 2 prefix tokens, then 5 patches
    x = torch.stack([vals, -2 * vals], -1).reshape(1, 1, 7, 2)
    expected = torch.tensor([10.0, 20.0, 1.0, 3.0, 5.0, 7.0, 9.0])
    torch.testing.assert_close(raster_diff(x, 2), torch.stack([expected, -2 * expected], -1).reshape(1, 1, 7, 2))
    expected0 = torch.tensor([10.0, 10.0, -19.0, 3.0, 5.0, 7.0, 9.0])  # no prefix: only token 0 is raw
    torch.testing.assert_close(raster_diff(x, 0)[..., 0], expected0.reshape(1, 1, 7))


def test_diffsim_kernel_uses_raster_differences():
    torch.manual_seed(20)
    kern = KERNELS.build("diffsim", None, head_dim=8, num_heads=2, ndim=2, layer=0, depth=1, attn_drop=0.0)
    grid = make_grid((2, 3), 1)
    q, k, v = torch.randn(3, 2, 2, grid.num_tokens, 8).unbind(0)
    dq = torch.cat([q[:, :, :2], q[:, :, 2:] - q[:, :, 1:-1]], dim=2)
    dk = torch.cat([k[:, :, :2], k[:, :, 2:] - k[:, :, 1:-1]], dim=2)
    probs = (dq @ dk.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    torch.testing.assert_close(kern.probs(q, k, 8 ** -0.5, grid), probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kern(q, k, v, 8 ** -0.5, grid), probs @ v, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 12. resolution change and token PE tables


@pytest.mark.parametrize("token_pe", ["none", "learned", "sincos"])
@pytest.mark.parametrize("qk", ["none", "rope_axial", "pope"])
def test_model_runs_at_other_resolutions(token_pe, qk):
    model = tiny_model(seed=0, token_pe=token_pe, qk_pe=qk)
    torch.manual_seed(21)
    with torch.no_grad():
        for size in [(24, 24), (8, 16), (16, 16)]:
            out = model(torch.randn(2, 3, *size))
            assert out.shape == (2, 5)
            assert torch.isfinite(out).all()


def test_learned_pe_resize():
    torch.manual_seed(22)
    pe = TOKEN_PES.build("learned", None, dim=8, grid_shape=(4, 4), num_prefix=1)
    assert pe.resized((4, 4)) is pe.table
    big = pe.resized((6, 5))
    assert big.shape == (1, 1 + 30, 8)
    torch.testing.assert_close(big[:, :1], pe.table[:, :1])  # prefix rows kept
    with torch.no_grad():
        pe.table[:, 1:] = torch.arange(8.0)  # constant over the grid, per channel
    torch.testing.assert_close(pe.resized((6, 5))[:, 1:], torch.arange(8.0).expand(1, 30, 8), rtol=0, atol=1e-5)

    # resampled as timm resamples its own ViTs' tables (antialiased bicubic), so a vitlab learned arm and a
    # timm arm of one resolution sweep follow one rule (plain bicubic differed by 50% at 4x4 -> 2x2)
    from timm.layers import resample_abs_pos_embed
    with torch.no_grad():
        pe.table.normal_()
    for shape in [(2, 2), (3, 3), (6, 5)]:
        torch.testing.assert_close(pe.resized(shape), resample_abs_pos_embed(pe.table, list(shape), old_size=[4, 4],
                                                                             num_prefix_tokens=1), rtol=0, atol=0)


def test_backbone_init_is_the_same_whatever_the_pe_or_kernel():
    """At one seed every arm's backbone (patch embedding, qkv, MLP, norms, head) starts from the same
    weights: the PEs' and kernels' own random draws (RoPE-Mixed angles, STRING reflections, the
    differential lambdas, a learned table) come from streams of their own. They shifted the global
    stream, so 12 of 31 backbone tensors, qkv and head included, differed between arms."""
    def backbone(**kw):
        model = tiny_model(seed=3, token_pe=kw.pop("token_pe", "none"), **kw)
        return {k: v for k, v in model.state_dict().items() if not any(p in k for p in ("qk_pe.", "kernel.", "token_pe."))}

    plain = backbone(qk_pe="rope_axial")
    for arm in [dict(qk_pe="rope_mixed"), dict(qk_pe="string_reflection"), dict(qk_pe="rope_axial", attn="differential"),
                dict(qk_pe="none", token_pe="learned"), dict(qk_pe="pope", attn="suppression")]:
        other = backbone(**arm)
        assert other.keys() == plain.keys() and all(torch.equal(other[k], plain[k]) for k in plain), arm
    assert not torch.equal(tiny_model(seed=4).blocks[0].attn.qkv.weight, tiny_model(seed=3).blocks[0].attn.qkv.weight)
    mixed = [tiny_model(seed=s, qk_pe="rope_mixed").blocks[0].attn.qk_pe.freqs for s in (3, 3, 4)]
    assert torch.equal(mixed[0], mixed[1]) and not torch.equal(mixed[0], mixed[2])  # the PE's own draws: seeded


@pytest.mark.parametrize("token_pe", ["none", "sincos", "learned"])
def test_residual_stream_is_float32_under_autocast_whatever_the_token_pe(token_pe):
    """Under bf16 autocast the blocks add into a float32 stream for every token PE; with none or
    sincos it stayed bf16 (the patch embedding's output), with a learned table float32: arms compared
    at different precision."""
    model = tiny_model(token_pe=token_pe, pool="mean", num_cls=0)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 16, 16))
    assert seen == [torch.float32]
    half = tiny_model(token_pe=token_pe).to(torch.bfloat16)  # a model cast to bf16 keeps a bf16 stream
    assert half(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2)])
def test_sincos_table_by_hand(shape):
    dim, num_prefix = 24, 1
    grid = make_grid(shape, num_prefix)
    pe = TOKEN_PES.build("sincos", None, dim=dim, grid_shape=shape, num_prefix=num_prefix)
    table = pe(torch.zeros(1, grid.num_tokens, dim), grid)[0]
    torch.testing.assert_close(table, pad_prefix(sincos_table(grid.coords, dim), num_prefix))
    assert table[:num_prefix].abs().max() == 0
    # Each axis owns a contiguous block of dim/ndim channels: sines then cosines of coord * 10000^(-i/n).
    ndim = len(shape)
    n = dim // (2 * ndim)
    ref = torch.zeros(grid.num_patches, dim, dtype=torch.float64)
    for t, coord in enumerate(grid.coords.double()):
        for a in range(ndim):
            for i in range(n):
                ang = coord[a] * 10000.0 ** (-i / n)
                ref[t, a * 2 * n + i] = math.sin(ang)
                ref[t, a * 2 * n + n + i] = math.cos(ang)
    torch.testing.assert_close(table[num_prefix:].double(), ref, rtol=0, atol=1e-5)


def test_sincos_2d_matches_timm():
    from timm.layers import build_sincos2d_pos_embed

    dim, shape = 32, (3, 5)
    n = dim // 4
    grid = make_grid(shape, 0)
    mine = sincos_table(grid.coords, dim)
    # timm (reverse_coord=False): tokens row-major over (H, W), channels [sin y, sin x, cos y, cos x].
    theirs = build_sincos2d_pos_embed(list(shape), dim=dim, temperature=10000.0)
    blocks = theirs.split(n, dim=-1)
    torch.testing.assert_close(mine, torch.cat([blocks[1], blocks[3], blocks[0], blocks[2]], -1),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 13. non-square images


@pytest.mark.parametrize("patch_proj", ["conv", "linear"])
def test_non_square_grid_coordinates_and_token_order(patch_proj):
    model = tiny_model(seed=0, img_size=(8, 16), patch_size=4, qk_pe="rope_axial", patch_proj=patch_proj)
    grid = make_grid((2, 4), 1)
    for n in range(8):
        assert grid.coords[n].tolist() == [n % 4, n // 4]
    # Patch token n is the patch at row n // 4, column n % 4 of the image.
    img = torch.zeros(1, 3, 8, 16)
    img[:, :, 4:8, 8:12] = 1.0  # row 1, column 2 -> token 6
    with torch.no_grad():
        tokens, shape = model.patch_embed(img)
        base, _ = model.patch_embed(torch.zeros_like(img))
    assert shape == (2, 4)
    changed = ((tokens - base).abs().amax(-1) > 0)[0].nonzero().flatten().tolist()
    assert changed == [6]


def test_non_square_rope_axial_rotation_by_hand():
    torch.manual_seed(23)
    d, heads = 16, 2
    pe = build_pe("rope_axial", 2, heads=heads, head_dim=d)
    grid = make_grid((2, 4), 0)  # what an 8 x 16 image with patch 4 gives
    q, k = torch.randn(2, 1, heads, 8, d).unbind(0)
    q1, k1 = pe(q, k, grid)
    quarter = d // 4
    w = torch.tensor([100.0 ** (-i / quarter) for i in range(quarter)], dtype=torch.float64)
    angles = torch.zeros(8, d // 2, dtype=torch.float64)
    for n in range(8):
        x, y = n % 4, n // 4
        angles[n, :quarter] = x * w
        angles[n, quarter:] = y * w
    torch.testing.assert_close(q1.double(), rope_by_hand(q, angles), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1.double(), rope_by_hand(k, angles), rtol=1e-5, atol=1e-5)


def test_hand_written_backwards_pass_gradcheck():
    """RoPE's rotation and PoPE's polar projection have hand-written backward passes."""
    from vitlab.models.pope import PolarProject, softplus_fwd
    from vitlab.models.qk_base import _Rotate

    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    for shape in [(5, 8), (3, 5, 8)]:  # shared tables (axial) and per-head tables (mixed, PoPE keys)
        c = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        s = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_Rotate.apply, (x, c, s))
        assert torch.autograd.gradcheck(PolarProject.apply, (x, c, s))
    z = torch.linspace(-40, 40, 20001)
    assert (softplus_fwd(z) - torch.nn.functional.softplus(z)).abs().max() < 1e-6
