"""timm baselines: a vitlab q/k PE inside a timm ViT, and pretrained weights from a local file."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitlab.config import load_config
from vitlab.models.timm_insert import insert_qk_pe
from vitlab.train.build import build_model


def tiny_timm():
    return TimmViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, qkv_bias=True)


def test_inserted_attention_with_no_pe_reproduces_timm():
    ref = tiny_timm().eval()
    m = tiny_timm().eval()
    m.load_state_dict(ref.state_dict())
    insert_qk_pe(m, "none")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
    assert set(m.state_dict()) == set(ref.state_dict())  # timm's parameter names: checkpoints load unchanged


@pytest.mark.parametrize("qk", ["rope_axial", "pope", "string_cayley"])
def test_inserted_pe_changes_attention_and_trains(qk):
    torch.manual_seed(0)
    ref = tiny_timm().eval()
    m = tiny_timm()
    m.load_state_dict(ref.state_dict())
    insert_qk_pe(m, qk)
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    if qk != "string_cayley":  # STRING starts as RoPE, which already differs from no PE
        assert not torch.allclose(m(x), ref(x), atol=1e-4)
    m.train()
    m(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 3)


def test_deit_small_plus_pope_from_config():
    cfg = load_config("brain-mri-pope-quick", ["model.name=timm:deit_small_patch16_224", "model.qk_pe=pope"])
    model, mcfg = build_model(cfg, in_chans=3, num_classes=4, img_size=(32, 32))
    assert mcfg["qk_pe"] == "pope" and type(model.blocks[0].attn).__name__ == "TimmAttention"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_pretrained_from_local_file(tmp_path):
    import timm
    src = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    cfg = load_config("fashion-mnist-quick", ["model.name=timm:resnet18", f"model.pretrained={path}"])
    model, _ = build_model(cfg, in_chans=3, num_classes=10, img_size=(32, 32))
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight)
    cfg = load_config("fashion-mnist-quick", ["model.name=timm:resnet18", f"model.pretrained={tmp_path}/nope.pth"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(cfg, in_chans=3, num_classes=10, img_size=(32, 32))
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model(load_config("fashion-mnist-quick", ["model.name=timm:resnet_nonexistent"]), in_chans=3,
                    num_classes=10, img_size=(32, 32))


def test_attention_with_parts_vitlab_would_drop_is_refused():
    """q/k norms or a scale norm in timm's attention would vanish in vitlab's replacement: refused,
    never a model silently changed (pretrained weights would load into a different network)."""
    for kw, part in (({"qk_norm": True}, "k_norm, q_norm"), ({"scale_attn_norm": True}, "its norm")):
        m = TimmViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3, **kw)
        with pytest.raises(ValueError, match=f"{part}.*would drop"):
            insert_qk_pe(m, "rope_axial")


def test_inserted_pe_parameters_get_no_weight_decay():
    """timm's no_weight_decay() names only its pos_embed and tokens; an inserted PE's frequencies,
    phase bias or STRING basis must stay out of weight decay as in vitlab's own ViT."""
    from vitlab.train.build import param_groups

    for qk in ("rope_mixed", "pope", "string_cayley"):
        m = insert_qk_pe(tiny_timm(), qk)
        decay, no_decay = param_groups(m, 0.05)
        pe = {id(p) for n, p in m.named_parameters() if ".qk_pe." in n}
        assert pe and pe <= {id(p) for p in no_decay["params"]} and not pe & {id(p) for p in decay["params"]}
        assert any(p is m.blocks[0].attn.qkv.weight for p in decay["params"])  # the rest as before


def test_grid_follows_the_image_through_every_entry_point():
    """The grid is read off the image where timm embeds it, so forward_features (called first, or at
    another size than the last forward) uses the right coordinates, as forward does."""
    m = insert_qk_pe(TimmViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                             dynamic_img_size=True), "rope_axial").eval()
    x = torch.randn(1, 3, 16, 24)
    feats = m.forward_features(x)  # before any forward
    assert feats.shape == (1, 1 + 4 * 6, 32)
    torch.testing.assert_close(m.forward_head(feats), m(x))
    assert m.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 17, 32)


@pytest.mark.parametrize("name,kwargs,words", [
    ("beit_base_patch16_224", {}, "timm.models.beit.Block, not timm's vision_transformer Block"),  # q/v biases, rel-pos
    ("eva02_tiny_patch14_224", {}, "timm.models.eva.EvaBlock"),  # its own rope, q/k/v biases
    ("vit_small_patch16_18x2_224", {}, "ParallelThingsBlock"),
    ("vit_small_r26_s32_224", {}, "HybridEmbed, not timm's PatchEmbed"),
    ("vit_tiny_patch16_224", {"patch_drop_rate": 0.5}, "drops patches in training"),
])
def test_timm_models_vitlab_cannot_serve_are_refused_before_their_first_forward(name, kwargs, words):
    """These were accepted and then crashed at the first forward (or would have dropped BEiT's and Eva's
    own attention parameters); the config check builds them on the meta device and refuses them."""
    with torch.device("meta"):
        model = __import__("timm").create_model(name, **kwargs)
    with pytest.raises(ValueError, match=words):
        insert_qk_pe(model, "rope_axial")
    with pytest.raises(ValueError, match=words.split(",")[0]):
        load_config("fashion-mnist-quick", [f"model.name=timm:{name}", "model.qk_pe=rope_axial",
                                            *(f"model.{k}={v}" for k, v in kwargs.items())])


def _tiny_timm(**kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                             num_classes=3, dynamic_img_size=True, **kwargs).eval()


def test_padded_patch_embedding_rounds_the_grid_up():
    model = insert_qk_pe(_tiny_timm(dynamic_img_pad=True), "rope_axial")
    assert model(torch.randn(2, 3, 20, 28)).shape == (2, 3)  # a 3 x 4 grid of padded patches


def test_threads_running_one_inserted_model_read_their_own_grid():
    """The grid was one attribute per model: a thread on 32x64 images read the 64x32 grid another
    thread had just embedded (the same token count, so no error: 216 of 300 outputs wrong)."""
    import threading

    model = insert_qk_pe(_tiny_timm(), "rope_axial")
    images = {s: torch.randn(2, 3, *s, generator=torch.Generator().manual_seed(s[0])) for s in ((32, 64), (64, 32))}
    with torch.no_grad():
        want = {s: model(x) for s, x in images.items()}
    wrong = []

    def run(shape):
        with torch.no_grad():
            for _ in range(40):
                if not torch.equal(model(images[shape]), want[shape]):
                    wrong.append(shape)

    threads = [threading.Thread(target=run, args=(s,)) for s in images for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    import copy
    assert torch.equal(copy.deepcopy(model)(images[(32, 64)]), want[(32, 64)])  # EMA's deepcopy still works
