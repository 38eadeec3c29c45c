"""Run configs: presets validate, overrides parse, bad keys and types are rejected in one line."""
import pytest

from vitlab.config import load_config, parse_overrides, presets, validate


def test_every_shipped_preset_validates():
    names = presets()
    assert {"fashion-mnist", "fashion-mnist-quick"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.train.epochs >= 1


def test_overrides_nest_and_parse_types():
    raw = parse_overrides(["train.lr=3e-4", "model.qk_pe=rope_mixed", "model.qk_pe_kwargs.sparsity=0.5",
                           "data.hflip=true", "model.img_size=[32, 32]"])
    assert raw == {"train": {"lr": 3e-4}, "model": {"qk_pe": "rope_mixed", "qk_pe_kwargs": {"sparsity": 0.5},
                                                    "img_size": [32, 32]}, "data": {"hflip": True}}
    cfg = load_config("fashion-mnist-quick", ["train.lr=3e-4", "model.qk_pe=pope"])
    assert cfg.train.lr == 3e-4 and cfg.model["qk_pe"] == "pope"


@pytest.mark.parametrize("overrides,words", [
    (["train.lrr=1"], ["unknown key 'train.lrr'", "train.lr"]),
    (["train.epochs=abc"], ["train.epochs", "abc"]),
    (["train.epochs=0"], ["train.epochs"]),
    (["model.qk_pe=ropee"], ["ropee", "rope_axial"]),
    (["model.colour=1"], ["model.colour", "model.qk_pe"]),
    (["model.name=resnet"], ["model.name", "timm:"]),
    (["model.dim=50", "model.heads=4"], ["dim=50"]),
    (["nosection=1"], ["section.key=value"]),
    (["data.limit=-5"], ["data.limit"]),
    (["train.precision=fp8"], ["train.precision"]),
    # vitlab's ViT takes no weights: accepted, the key was recorded in config.yaml and ignored
    (["model.pretrained=/weights.pt"], ["model.pretrained='/weights.pt' applies to timm models"]),
    # settings that validated, then failed or misled only once training ran
    (["data.split=pooled", "data.val_fraction=0.6", "data.test_fraction=0.6"], ["leaves nothing to train on"]),
    # a timm model is built on the meta device: keys it does not take, a q/k PE for a model that is no ViT
    (["model.name=timm:resnet18", "model.depth=3"], ["timm model 'resnet18' does not take ['depth']"]),
    (["model.name=timm:resnet18", "model.qk_pe=pope"], ["model.qk_pe needs a timm VisionTransformer"]),
    (["model.name=timm:vit_tiny_patch16_224", "model.attn=differential"], ["heads=3 is odd"]),
    # true/false is not a number (pydantic's lax mode read true as 1: one epoch, one block)
    (["train.epochs=true"], ["train.epochs: expected a number, not true/false"]),
    (["data.auto_augment_policy=cifar100"], ["data.auto_augment_policy", "imagenet"]),
    (["data.randaugment_magnitude=31"], ["data.randaugment_magnitude"]),
    (["model.depth=true"], ["depth: expected a number, not true/false"]),
    (["data.val_fraction=false"], ["data.val_fraction"]),
    # the data source and its option names are checked here too, so `vitlab validate` and a comparison's
    # up-front check catch them before any run starts
    (["data.name=fashion_mnist"], ["data.name", "'fashion_mnist'", "fashion-mnist"]),
    (["data.options.colour=1"], ["data.options", "'colour'", "download"]),
    (["data.name=imagefolder", "data.options.img_sise=32"], ["'img_sise'", "img_size", "classes"]),
    # and the values of sources whose options can be checked without reading data
    (["data.name=imagefolder", "data.options.intensity=median"], ["data.options", "intensity='median'", "percentile"]),
    (["data.name=volumes", "data.options.size=5"], ["volumes option size=5", "three positive ints"]),
    (["data.name=mricron-brain", "data.options.patch=5"], ["mricron-brain option patch=5"]),
    (["data.name=synthetic", "data.options.img_size=2.5"], ["synthetic option img_size=2.5"]),
    (["data.name=synthetic", "data.options.n_train=true"], ["synthetic option n_train=True"]),
    (["data.name=cifar100", "data.options.labels=medium"], ["cifar100 option labels='medium'", "coarse"]),
    (["data.name=imagefolder", "data.options.classes=/nonexistent/list.txt"], ["classes='/nonexistent/list.txt'"]),
    # timm models: the model name and the vitlab q/k PE and kernel put inside them
    (["model.name=timm:resnet1800"], ["model.name", "'resnet1800'", "timm.list_models"]),
    (["model.name=timm:deit_tiny_patch16_224", "model.qk_pe=ropee"], ["model.qk_pe", "'ropee'", "rope_axial"]),
    (["model.name=timm:deit_tiny_patch16_224", "model.qk_pe=string_cayley", "model.qk_pe_kwargs.sparsty=0.2"],
     ["model.qk_pe_kwargs", "'sparsty'", "sparsity"]),
    (["model.name=timm:deit_tiny_patch16_224", "model.attn=diff"], ["model.attn", "'diff'", "differential"]),
    (["model.name=timm:deit_tiny_patch16_224", "model.qk_pe=[1]"], ["model.qk_pe=[1]", "rope_axial"]),
    (["model.name=timm:deit_tiny_patch16_224", "model.qk_pe=pope", "model.qk_pe_kwargs=3"], ["model.qk_pe_kwargs=3"]),
])
def test_bad_overrides_are_one_line_errors(overrides, words):
    with pytest.raises(ValueError) as err:
        load_config("fashion-mnist-quick", overrides)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_an_experiment_given_as_a_run_config_names_the_command_that_takes_it(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("base: fashion-mnist-quick\narms: {a: {}}\n")
    with pytest.raises(ValueError, match=r"is an experiment \(it has 'arms'\).*vitlab compare .*exp.yaml --dry-run"):
        load_config(str(exp))
    with pytest.raises(ValueError, match=r"'string-cifar-quick' is a study .*vitlab compare string-cifar-quick --dry-run"):
        load_config("string-cifar-quick")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown preset 'fmnist'.*fashion-mnist"):
        load_config("fmnist")


def test_yaml_file_with_base(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("base: fashion-mnist-quick\ntrain:\n  epochs: 1\n")
    cfg = load_config(str(path))
    assert cfg.train.epochs == 1 and cfg.data.name == "fashion-mnist"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.yaml"))
    assert validate({"model": {"patch_size": 4}}).data.name == "fashion-mnist"
    # the data's real size is checked against the patch (Fashion-MNIST: 28 px), not a stand-in size
    with pytest.raises(ValueError, match=r"img_size=\(28, 28\) is not divisible by patch_size=\(16, 16\)"):
        validate({})


def test_another_data_source_does_not_inherit_the_base_options():
    """Source options belong to their source: naming another data.name drops the base's options
    (volume-3d-quick's mricron-brain `patch` would be an unknown option of synthetic)."""
    cfg = load_config("volume-3d-quick", ["data.name=synthetic", "data.options.img_size=[16, 16, 16]"])
    assert cfg.data.options == {"img_size": [16, 16, 16]}
    same = load_config("volume-3d-quick", ["data.options.per_class=5"])
    assert same.data.name == "mricron-brain" and set(same.data.options) == {"patch", "per_class"}


def test_a_relative_base_is_read_beside_the_file_that_names_it(tmp_path, monkeypatch):
    """`base: syn.yaml` in sub/child.yaml is sub/syn.yaml, from whatever directory the command runs:
    it was read from the current directory (a wrong config silently, or file not found)."""
    from vitlab.compare import load_experiment
    from vitlab.config import load_config

    (tmp_path / "sub").mkdir()
    (tmp_path / "syn.yaml").write_text("base: fashion-mnist-quick\nmodel: {dim: 32}\n")  # the decoy
    (tmp_path / "sub" / "syn.yaml").write_text("base: fashion-mnist-quick\nmodel: {dim: 64}\n")
    (tmp_path / "sub" / "child.yaml").write_text("base: syn.yaml\ntrain: {epochs: 2}\n")
    (tmp_path / "sub" / "exp.yaml").write_text("base: syn.yaml\narms: {a: {}}\n")
    for cwd in (tmp_path, tmp_path / "sub", tmp_path.parent):
        monkeypatch.chdir(cwd)
        cfg = load_config(str(tmp_path / "sub" / "child.yaml"))
        assert cfg.model["dim"] == 64 and cfg.train.epochs == 2
        assert load_experiment(str(tmp_path / "sub" / "exp.yaml")).runs()[0].config.model["dim"] == 64
    monkeypatch.chdir(tmp_path)
    assert load_config("sub/child.yaml").model["dim"] == 64


def test_an_empty_config_file_says_so(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="empty.yaml: an empty config; give `base: PRESET`"):
        load_config(str(tmp_path / "empty.yaml"))


def test_override_quoting_and_conflicts_in_either_order():
    assert parse_overrides(['data.root="2024"']) == {"data": {"root": "2024"}}  # quoted: text
    assert parse_overrides(["train.lr=3e-4"]) == {"train": {"lr": 3e-4}}  # unquoted: a number
    for items in (["train.lr.x=2", "train.lr=1"], ["train.lr=1", "train.lr.x=2"]):
        with pytest.raises(ValueError, match="conflicts with another override"):
            parse_overrides(items)


def test_a_timm_vit_with_a_vitlab_pe_validates():
    cfg = load_config("fashion-mnist-quick", ["model.name=timm:vit_tiny_patch16_224", "model.qk_pe=rope_axial",
                                              "model.patch_size=4"])
    assert cfg.model["qk_pe"] == "rope_axial"


def test_gradient_clipping_only_where_a_preset_asks_for_it():
    """DeiT/timm clip no gradients by default, nor do DESIGN's recipes; the 1.0 default clipped 76% of
    the Mini-ViT preset's steps. Only the Fashion-MNIST recipe sets it."""
    assert load_config("fashion-mnist").train.clip_grad == 1.0
    for name in ("cifar10-minivit", "imagenet100-clearvit", "cifar10-string", "brain-mri-pope"):
        assert load_config(name).train.clip_grad is None
