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
