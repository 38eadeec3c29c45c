"""Leakage check: pHash equals imagehash's, near-duplicates are found across splits, dedupe removes them."""
import json
from pathlib import Path

import imagehash
import numpy as np
import PIL
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from vitlab.config import validate
from vitlab.data import (ArrayDataset, DataBundle, leakage_line, load_dataset, make_splits, phash,
                         split_from_json, split_to_json, stratified_split)
from vitlab.data.dedupe import dedupe_keep, duplicate_groups, near_pairs, popcount

FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def reference(images: torch.Tensor) -> np.ndarray:
    """imagehash.phash of each (C, H, W) uint8 image, through PIL, as uint64."""
    out = []
    for img in images:
        a = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a, mode=None)
        out.append(int(str(imagehash.phash(pil)), 16))
    return np.array(out, dtype=np.uint64)


def tiles(size=(48, 48), step=(48, 48)) -> torch.Tensor:
    """uint8 (N, 3, H, W) tiles of sklearn's two bundled photographs."""
    h, w = size
    out = [im[y:y + h, x:x + w] for im in load_sample_images().images
           for y in range(0, im.shape[0] - h + 1, step[0]) for x in range(0, im.shape[1] - w + 1, step[1])]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def test_phash_equals_imagehash_bit_for_bit_on_real_images():
    digits = torch.from_numpy(load_digits().images[:300] * (255 / 16)).round().to(torch.uint8)[:, None]
    for scale in (4, 3, 5):  # 32x32 (no resize), 24x24 and 40x40 (Lanczos up- and downscale)
        imgs = digits.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        assert np.array_equal(phash(imgs), reference(imgs)), scale
    sizes = [(48, 48), (20, 50), (17, 200)]  # RGB photographs, non-square, up- and downscaled
    if int(PIL.__version__.split(".")[0]) >= 13:  # Pillow 13 resizes these vertical pass first; older did not
        sizes += [(200, 17), (97, 64), (300, 33)]  # (checked against Pillow 12.3 and 13.0)
    for size in sizes:
        imgs = tiles(size, (53, 61))[:150]
        assert np.array_equal(phash(imgs), reference(imgs)), size
    # a volume is hashed by its middle slice along D
    vol = tiles((40, 40), (40, 40))[:12, :1, :, :, None].repeat(1, 1, 1, 1, 5)
    vol[..., :2] = 0
    assert np.array_equal(phash(vol), reference(vol[..., 2]))


@pytest.mark.skipif(not FASHION_SYSTEM.is_dir(), reason="needs Debian's dataset-fashion-mnist "
                    "(/usr/share/datasets/fashion-mnist); CI installs it")
def test_phash_equals_imagehash_on_fashion_mnist():
    imgs = load_dataset("fashion-mnist", limit=600, seed=1).train.images
    assert np.array_equal(phash(imgs), reference(imgs))


def test_near_pairs_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, k, replace=False))) for k in rng.integers(1, 9, 300)]
    # half random hashes, half a random hash with 1..8 bits flipped, and 100 sharing their low 40 bits
    # (one big bucket for every chunk below bit 40: the blockwise path)
    crowd = (rng.integers(0, 2**24, 100, dtype=np.uint64) << np.uint64(40)) | np.uint64(12345)
    h = np.unique(np.concatenate([base, base ^ np.array(flips, dtype=np.uint64), crowd]))
    d = popcount(h[:, None] ^ h[None, :])
    for t in range(0, 9):
        i, j = np.nonzero(np.triu(d <= t, 1))
        assert np.array_equal(near_pairs(h, t), np.stack([i, j], 1)), t
    assert len(near_pairs(h, 8)) > 300  # the test exercised real neighbours


def bundle_with_copies(official_test: bool):
    """Photograph tiles (no two within pHash distance 8) in 4 classes, plus, in the test part, an
    exact copy, a brightened (+40) copy and a noisy (sigma 8) copy of three training-pool tiles."""
    imgs = tiles()
    labels = torch.arange(len(imgs)) % 4
    h = phash(imgs)
    assert popcount(h[:, None] ^ h[None, :])[np.triu_indices(len(h), 1)].min() > 8  # the premise
    # copy three textured tiles (a flat patch of sky has no stable low frequencies: noise flips its bits)
    src = sorted(torch.argsort(imgs[:150].float().flatten(1).std(1), descending=True)[:3].tolist())
    gen = torch.Generator().manual_seed(0)
    a, b, c = imgs[src]
    copies = torch.stack([a, (b.int() + 40).clamp(0, 255).to(torch.uint8),
                          (c.float() + 8 * torch.randn(c.shape, generator=gen)).round().clamp(0, 255).to(torch.uint8)])
    dist = popcount(phash(copies) ^ h[src])
    assert dist[0] == 0 and 0 < dist[1] + dist[2] and dist.max() <= 4  # altered copies: near, not equal
    classes = ["a", "b", "c", "d"]
    if official_test:
        n = 160
        test = ArrayDataset(torch.cat([imgs[n:], copies]), torch.cat([labels[n:], labels[src]]), classes, "t")
        return DataBundle(ArrayDataset(imgs[:n], labels[:n], classes, "t"), test, "mem"), src
    pool = ArrayDataset(torch.cat([imgs, copies]), torch.cat([labels, labels[src]]), classes, "t")
    return DataBundle(pool, None, "mem"), src


def brute_crossings(bundle, split, t=4):
    """cross_a_b by definition: part-b items with a part-a item within distance t."""
    n = len(bundle.train)
    h = phash(bundle.train.images if bundle.test is None else torch.cat([bundle.train.images, bundle.test.images]))
    test = split["test"].numpy() if split["test"] is not None else np.arange(n, len(h))
    parts = {"train": split["train"].numpy(), "val": split["val"].numpy(), "test": test}
    out = {}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        d = popcount(h[parts[b]][:, None] ^ h[parts[a]][None, :])
        out[f"cross_{a}_{b}"] = int((d <= t).any(1).sum())
    return out


@pytest.mark.parametrize("official_test", [True, False])
def test_injected_copies_are_found_across_the_split(official_test):
    bundle, src = bundle_with_copies(official_test)
    split = make_splits(bundle, val_fraction=0.2, seed=1)
    rec = split["leakage"]
    assert {k: rec[k] for k in ("method", "threshold", "pairs", "groups", "duplicates", "removed")} == \
        {"method": "phash", "threshold": 4, "pairs": 3, "groups": 3, "duplicates": 6, "removed": 0}
    crossings = {k: v for k, v in rec.items() if k.startswith("cross_")}
    assert crossings == brute_crossings(bundle, split)
    if official_test:  # each copy is a test image whose original is in train or val
        assert rec["cross_train_test"] + rec["cross_val_test"] == 3
    assert sum(crossings.values()) >= 1
    # without dedupe the split is exactly the plain stratified one (old runs keep their split)
    fractions = (0.8, 0.2) if official_test else (0.7, 0.2, 0.1)
    plain = stratified_split(bundle.train.labels, fractions, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain, [split["train"], split["val"], split["test"]]))
    assert "test images have a near-duplicate in train" in leakage_line(split_to_json(split))


@pytest.mark.parametrize("official_test", [True, False])
def test_dedupe_removes_them_and_keeps_the_split_stratified(official_test):
    bundle, src = bundle_with_copies(official_test)
    split = make_splits(bundle, val_fraction=0.2, seed=1, dedupe=True)
    rec = split["leakage"]
    assert rec["removed"] == 3 and rec["duplicates"] == 6  # found before, removed from the pool
    assert all(rec[k] == 0 for k in ("cross_train_test", "cross_train_val", "cross_val_test"))
    assert brute_crossings(bundle, split) == {k: 0 for k in ("cross_train_test", "cross_train_val", "cross_val_test")}
    used = torch.cat([split["train"], split["val"]] + ([split["test"]] if split["test"] is not None else []))
    n = len(bundle.train)
    dropped = sorted(set(range(n)) - set(used.tolist()))
    # a fixed test set keeps its copies and loses the originals; a pool keeps the first of each pair
    assert dropped == (src if official_test else [n - 3, n - 2, n - 1])
    kept_labels = bundle.train.labels[torch.tensor(sorted(used.tolist()))]
    for c, count in enumerate(torch.bincount(kept_labels).tolist()):  # floor/ceil of each class's share
        val_c = int((bundle.train.labels[split["val"]] == c).sum())
        assert abs(val_c - 0.2 * count) < 1
    assert "data.dedupe removed 3 training-pool images" in leakage_line(split_to_json(split))



def test_pooled_official_test_set_is_checked_and_deduped_like_a_pool():
    """data.split=pooled: the official test set joins the pool, which is split 70/20/10 here; the
    leakage check sees the same pairs, and dedupe keeps the first of each (the originals in the
    former training set), so no near-duplicate crosses a boundary."""
    from vitlab.data.load import pool_test_set

    official, src = bundle_with_copies(True)
    bundle = pool_test_set(official)
    n_train, n = len(official.train), len(bundle.train)
    assert bundle.test is None and bundle.pooled and n == n_train + len(official.test)
    assert torch.equal(bundle.train.images[n_train:], official.test.images)
    split = make_splits(bundle, val_fraction=0.2, test_fraction=0.1, seed=1)
    assert split["scheme"] == "70/20/10 (pooled: train + official test)"
    assert all(abs(len(split[k]) - f * n) <= 1 for k, f in (("train", 0.7), ("val", 0.2), ("test", 0.1)))
    assert set(split["test"].tolist()) & set(range(n_train, n))  # former test images in every part
    assert set(split["train"].tolist()) & set(range(n_train, n))
    rec = split["leakage"]
    assert (rec["pairs"], rec["duplicates"], rec["removed"]) == (3, 6, 0)
    assert {k: v for k, v in rec.items() if k.startswith("cross_")} == brute_crossings(bundle, split)
    deduped = make_splits(bundle, val_fraction=0.2, test_fraction=0.1, seed=1, dedupe=True)
    assert deduped["leakage"]["removed"] == 3
    assert brute_crossings(bundle, deduped) == {k: 0 for k in ("cross_train_test", "cross_train_val", "cross_val_test")}
    used = torch.cat([deduped[k] for k in ("train", "val", "test")]).tolist()
    assert sorted(set(range(n)) - set(used)) == [n - 3, n - 2, n - 1]  # the copies, last in the pool
    back = split_from_json(json.loads(json.dumps(split_to_json(deduped))))
    assert back["scheme"] == deduped["scheme"] and torch.equal(back["test"], deduped["test"])

def test_split_is_deterministic_and_round_trips_json():
    bundle, _ = bundle_with_copies(False)
    a = make_splits(bundle, seed=5, dedupe=True)
    b = make_splits(bundle, seed=5, dedupe=True)
    text = json.dumps(split_to_json(a))
    assert text == json.dumps(split_to_json(b))
    back = split_from_json(json.loads(text))
    assert back["leakage"] == a["leakage"] and torch.equal(back["train"], a["train"])
    assert not torch.equal(make_splits(bundle, seed=6, dedupe=True)["train"], a["train"])
    assert make_splits(bundle, check_leakage=False)["leakage"] is None
    # split.json written before the leakage check still loads
    old = {k: v for k, v in split_to_json(a).items() if k != "leakage"}
    assert "leakage" not in split_from_json(old) and leakage_line(old) == "Leakage check: not recorded for this split."


def test_groups_are_chains_and_dedupe_keeps_far_ends():
    a, b, c = np.uint64(0), np.uint64(0b1111), np.uint64(0b11111111)  # d(a,b) = d(b,c) = 4, d(a,c) = 8
    dup = duplicate_groups(np.array([a, b, c, a], dtype=np.uint64), 4)
    assert dup.groups == 1 and dup.pairs == 4 and dup.in_group.all()  # (0,1) (0,3) (1,2) (1,3)
    assert dedupe_keep(dup).tolist() == [True, False, True, False]
    assert dedupe_keep(dup, np.array([False, False, True, False])).tolist() == [True, False, True, False]
    assert dedupe_keep(dup, np.array([False, True, False, False])).tolist() == [False, True, False, False]
    assert duplicate_groups(np.array([a, b, c], dtype=np.uint64), 3).groups == 0


def write_png_tree(root: Path, imgs: torch.Tensor):
    for i, img in enumerate(imgs):
        folder = root / ("x" if i % 2 else "y")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def test_streamed_folders_are_checked_only_with_dedupe(tmp_path):
    imgs = tiles()[:20]
    write_png_tree(tmp_path, torch.cat([imgs, imgs[:2]]))  # items 20, 21 copy 0 and 1 (same classes)
    bundle = load_dataset("imagefolder", str(tmp_path), img_size=48, stream=True)
    rec = make_splits(bundle, seed=0)["leakage"]
    assert "skipped" in rec and "skipped (streamed" in leakage_line({"leakage": rec})
    rec = make_splits(bundle, seed=0, dedupe=True)["leakage"]
    assert rec["pairs"] == 2 and rec["removed"] == 2 and rec["cross_train_test"] == 0


def test_bad_threshold_and_images_are_one_line_errors():
    bundle, _ = bundle_with_copies(True)
    for bad in (-1, 17, 2.0, True):
        with pytest.raises(ValueError, match="dedupe threshold must be an int in \\[0, 16\\]"):
            make_splits(bundle, dedupe_threshold=bad)
    with pytest.raises(ValueError, match="phash needs uint8"):
        phash(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="dedupe_threshold"):
        validate({"data": {"dedupe_threshold": 20}})
    assert validate({"data": {"dedupe": True, "dedupe_threshold": 2}, "model": {"patch_size": 4}}).data.dedupe
