"""Batched augmentation: per-image randomness, shapes, determinism."""
import pytest
import torch

from vitlab.train.augment import BatchAugment, random_crop, random_flip


def test_flip_is_per_image_and_seeded():
    x = torch.arange(1 * 1 * 2 * 3, dtype=torch.uint8).reshape(1, 1, 2, 3).repeat(64, 1, 1, 1)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(3)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert (flipped ^ same).all() and 10 < flipped.sum() < 54  # each image one or the other, about half
    again = random_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_crop_shifts_each_image_within_the_pad():
    x = torch.zeros(32, 1, 9, 9, dtype=torch.uint8)
    x[:, :, 4, 4] = 255
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = torch.nonzero(out[:, 0] == 255)  # (img, row, col): the dot is never cut off with pad 2
    assert pos.shape[0] == 32
    assert ((pos[:, 1] - 4).abs() <= 2).all() and ((pos[:, 2] - 4).abs() <= 2).all()
    assert len({(r.item(), c.item()) for _, r, c in pos}) > 5  # shifts differ between images


def test_batch_augment_outputs_normalised_floats_and_soft_targets():
    aug = BatchAugment(mean=torch.tensor([0.5, 0.5, 0.5]), std=torch.tensor([0.25, 0.25, 0.25]), num_classes=4,
                       hflip=True, crop_pad=2, cutmix=1.0, mixup=0.8, random_erasing=0.5, auto_augment="autoaugment",
                       label_smoothing=0.1, seed=0)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8) % 4
    xa, ya = aug(x, y)
    assert xa.dtype == torch.float32 and xa.shape == (8, 3, 16, 16)
    assert ya.shape == (8, 4) and torch.allclose(ya.sum(1), torch.ones(8))
    plain = BatchAugment(mean=torch.tensor([0.5] * 3), std=torch.tensor([0.25] * 3), num_classes=4)
    xp, yp = plain(x, y)
    assert torch.equal(yp, y) and torch.allclose(xp, (x.float() / 255 - 0.5) / 0.25)


def test_resize_to_model_size():
    aug = BatchAugment(mean=torch.tensor([0.5]), std=torch.tensor([0.5]), num_classes=2, img_size=(24, 24))
    assert aug.normalize(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)).shape == (2, 1, 24, 24)


def test_random_affine_is_per_image_and_identity_at_zero():
    from vitlab.train.augment import random_affine

    x = torch.zeros(16, 1, 15, 15)
    x[:, :, 7, 3:12] = 1.0  # a horizontal bar
    gen = torch.Generator().manual_seed(0)
    same = random_affine(x, 0.0, 0.0, (1.0, 1.0), gen)
    assert torch.allclose(same, x, atol=1e-5)
    out = random_affine(x, 30.0, 0.1, (0.9, 1.1), gen)
    assert out.shape == x.shape
    assert len({o.numpy().tobytes() for o in out}) == 16  # a different transform per image
    assert not torch.allclose(out, x, atol=1e-2)


def test_random_affine_fills_with_black_after_normalisation():
    """Pixels a shift uncovers are black, as torchvision's RandomAffine(fill=0) makes them on raw
    images; before, the fill was 0 after normalisation, the mean grey."""
    mean, std = torch.tensor([0.3, 0.5, 0.7]), torch.tensor([0.2, 0.25, 0.3])
    aug = BatchAugment(mean=mean, std=std, num_classes=2, affine_translate=0.4, seed=1)
    x = torch.full((8, 3, 16, 16), 200, dtype=torch.uint8)
    out, _ = aug(x, torch.zeros(8, dtype=torch.long))
    raw = out * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)  # back to [0, 1]
    corners = raw[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.amin(dim=(1, 2)) < 1e-4).sum() >= 4  # most shifted images uncover a black corner
    assert raw.min() > -1e-4 and raw.max() < 200 / 255 + 1e-4  # only black and the image's own values


def test_grey_data_for_a_colour_model_and_back():
    from vitlab.train.augment import match_channels

    grey = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    rgb = match_channels(grey, 3)
    assert rgb.shape == (2, 3, 4, 4) and torch.equal(rgb[:, 2], grey[:, 0])
    assert torch.equal(match_channels(rgb, 1), grey)
    with pytest.raises(ValueError, match="4-channel data"):
        match_channels(torch.zeros(1, 4, 2, 2, dtype=torch.uint8), 3)


def test_policy_options_reach_torchvision_and_change_the_draws():
    """data.auto_augment_policy picks AutoAugment's learned policy (it was CIFAR-10's for every dataset);
    data.randaugment_ops/magnitude set RandAugment's; the defaults are the ones used before."""
    from torchvision.transforms import v2

    from vitlab.config import load_config

    def make(*overrides):
        cfg = load_config("fashion-mnist-quick", list(overrides))
        return BatchAugment.from_config(cfg, mean=torch.tensor([0.5] * 3), std=torch.tensor([0.25] * 3),
                                        num_classes=4, channels=3, img_size=None, seed=0, device=torch.device("cpu"))

    assert make("data.auto_augment=autoaugment").policy.policy == v2.AutoAugmentPolicy.CIFAR10
    imnet = make("data.auto_augment=autoaugment", "data.auto_augment_policy=imagenet")
    assert imnet.policy.policy == v2.AutoAugmentPolicy.IMAGENET
    ra = make("data.auto_augment=randaugment", "data.randaugment_ops=3", "data.randaugment_magnitude=5").policy
    assert (ra.num_ops, ra.magnitude) == (3, 5)
    assert (make("data.auto_augment=randaugment").policy.num_ops, make("data.auto_augment=randaugment").policy.magnitude) == (2, 9)
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(16) % 4
    cifar = make("data.auto_augment=autoaugment")(x, y)[0]
    assert not torch.equal(cifar, imnet(x, y)[0])  # another policy, other operations on the same draws
    assert torch.equal(cifar, make("data.auto_augment=autoaugment")(x, y)[0])
    strong = make("data.auto_augment=randaugment", "data.randaugment_magnitude=30")(x, y)[0]
    assert not torch.equal(strong, make("data.auto_augment=randaugment")(x, y)[0])


@pytest.mark.parametrize("policy", ["randaugment", "autoaugment"])
def test_library_transforms_draw_from_a_private_stream(policy):
    """torchvision's policies and timm's RandomErasing / MixUp draw from the global generators, which a
    model's dropout draws from too. Two arms of a comparison, one with dropout, must still see the
    same augmented batches for a seed; and augmenting must not move the model's generators."""
    import random

    import numpy as np

    def make():
        return BatchAugment(mean=torch.tensor([0.5] * 3), std=torch.tensor([0.25] * 3), num_classes=4, hflip=True,
                            crop_pad=2, cutmix=1.0, mixup=0.8, random_erasing=0.5, auto_augment=policy, seed=3)

    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8) % 4
    quiet, busy = make(), make()
    torch.manual_seed(0)
    for step in range(3):
        before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        xq, yq = quiet(x, y)
        assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
        assert np.array_equal(np.random.get_state()[1], before[2])
        torch.nn.functional.dropout(torch.ones(1000), 0.1)  # the other arm's dropout, between its batches
        random.random(), np.random.rand()
        xb, yb = busy(x, y)
        assert torch.equal(xq, xb) and torch.equal(yq, yb), f"step {step}"
    resumed = make()  # a checkpoint's state continues the same stream
    resumed.set_state(quiet.get_state())
    assert torch.equal(quiet(x, y)[0], resumed(x, y)[0])
    assert not torch.equal(quiet(x, y)[0], make()(x, y)[0])  # and the stream does move on


@pytest.mark.parametrize("h,w", [(32, 32), (16, 48), (48, 16)])
def test_random_affine_rotates_like_torchvision_on_non_square_images(h, w):
    """theta acts on per-axis normalised coordinates: on a 16x48 image the unscaled rotation matrix
    tilted a horizontal bar 9.9 degrees for a 29.7-degree draw (a rotation plus a stretch)."""
    from torchvision.transforms.v2 import functional as TF

    from vitlab.train.augment import random_affine

    x = torch.zeros(1, 1, h, w)
    x[..., h // 2 - 1:h // 2 + 1, 2:w - 2] = 1  # a cross: a bar each way
    x[..., 2:h - 2, w // 2 - 1:w // 2 + 1] = 1
    deg = float((torch.rand(4, 1, generator=torch.Generator().manual_seed(3))[0] * 2 - 1) * 30)
    out = random_affine(x, 30, 0.0, (1.0, 1.0), torch.Generator().manual_seed(3))
    ref = TF.affine(x, angle=-deg, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                    interpolation=TF.InterpolationMode.BILINEAR)
    assert abs(deg) > 20 and (out - ref).abs().max() < 1e-4
