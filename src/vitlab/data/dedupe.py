"""Leakage check: perceptual-hash near-duplicates, and where they fall in a split.

``phash`` is imagehash's ``phash`` (greyscale, Lanczos resize to 32x32, 2-D DCT, the 8x8
lowest frequencies thresholded at their median: 64 bits), computed over a whole uint8 image tensor
at once. imagehash works on one PIL image at a time (about 70k Pillow round trips for
Fashion-MNIST on every run); here Pillow's fixed-point grey conversion and Lanczos resampling are
reproduced as two matrix products, so the bits equal ``imagehash.phash`` exactly (tests/test_dedupe.py
checks that on real images). Volumes (N, C, H, W, D) are hashed by their middle slice along D.

Near-duplicates are pairs at Hamming distance <= ``threshold``; ``duplicate_groups`` finds them all
by multi-index hashing (pigeonhole: two hashes within distance t agree exactly on at least one of
t + 1 disjoint bit chunks, so only items sharing a chunk value are compared) and joins them into
groups (connected components). ``leakage`` counts the items that have a near-duplicate across each
boundary of a split; ``dedupe_keep`` picks the items a deduplicated split keeps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

HASH_SIZE = 8  # imagehash.phash defaults: hash_size=8, highfreq_factor=4
IMG_SIZE = HASH_SIZE * 4
DEFAULT_THRESHOLD = 4
_PRECISION_BITS = 32 - 8 - 2  # Pillow's Resample.c fixed-point precision for 8-bit images
_CHUNK_PIXELS = 1 << 24  # pixels per batch: bounds the float64 intermediates to ~130 MB


# ---------------------------------------------------------------- perceptual hash

def _lanczos3(x: float) -> float:
    # Pillow's lanczos_filter: sinc(x) * sinc(x / 3) on [-3, 3), evaluated with libm like Pillow does
    if not -3.0 <= x < 3.0:
        return 0.0

    def sinc(v: float) -> float:
        return 1.0 if v == 0.0 else math.sin(v * math.pi) / (v * math.pi)

    return sinc(x) * sinc(x / 3.0)


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's Lanczos resampling of one axis (``precompute_coeffs`` + ``normalize_coeffs_8bpc``)
    as an (out_size, in_size) matrix of its integer fixed-point coefficients, held in float64 (the
    products with uint8 pixels and their sums stay far below 2**53, so float matmuls are exact)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    out = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = [_lanczos3((x - center + 0.5) * (1.0 / filterscale)) for x in range(xmin, xmax)]  # Pillow's rounding
        total = sum(w)
        w = [v / total if total != 0.0 else v for v in w]
        out[xx, xmin:xmax] = [int(v * (1 << _PRECISION_BITS) + (0.5 if v >= 0 else -0.5)) for v in w]
    return out


def _resample(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """One Pillow resampling pass over ``axis`` of uint8 ``x``: fixed-point sum, round, clip."""
    y = np.moveaxis(np.moveaxis(x, axis, -1).astype(np.float64) @ k.T, -1, axis)
    return np.clip(np.floor((y + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)), 0, 255).astype(np.uint8)


def grey_images(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W) grey images as Pillow's ``convert("L")`` makes them: one channel as is, RGB
    (and RGBA, alpha ignored) by ITU-R 601-2 luma in Pillow's fixed point, two channels (grey + alpha)
    by the first, others by the rounded channel mean. Volumes (N, C, H, W, D): the middle slice."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim not in (4, 5):
        raise ValueError(f"phash needs uint8 (N, C, H, W) images or (N, C, H, W, D) volumes, "
                         f"got {x.dtype} {tuple(x.shape)}")
    if x.ndim == 5:
        x = x[..., x.shape[-1] // 2]
    a = x.numpy()
    c = a.shape[1]
    if c in (1, 2):
        return np.ascontiguousarray(a[:, 0])
    if c in (3, 4):  # Pillow's rgb2l: (19595 R + 38470 G + 7471 B + 0x8000) >> 16
        rgb = a[:, :3].astype(np.uint32)
        return ((rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16).astype(np.uint8)
    return np.round(a.astype(np.float64).mean(1)).astype(np.uint8)


def phash_grey(grey: np.ndarray) -> np.ndarray:
    """The 64-bit pHash of each uint8 (N, H, W) grey image, as uint64 with imagehash's bit order
    (``int(str(imagehash.phash(img)), 16)``)."""
    import scipy.fftpack  # the DCT routine imagehash calls, so coefficients at the median compare the same

    n, h, w = grey.shape
    kh = _resize_matrix(w, IMG_SIZE) if w != IMG_SIZE else None  # Pillow skips a pass whose size is unchanged
    kv = _resize_matrix(h, IMG_SIZE) if h != IMG_SIZE else None
    # Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many
    # pixels as the width (older Pillow, and so older imagehash results, always went horizontal first;
    # the two orders round differently). This follows Pillow 13, whatever Pillow is installed.
    vertical_first = kv is not None and (h - IMG_SIZE) > 0 and (h - IMG_SIZE) > 2 * (w - IMG_SIZE)
    out = np.empty(n, dtype=np.uint64)
    step = max(1, _CHUNK_PIXELS // max(h * w, 1))
    for s in range(0, n, step):
        x = grey[s:s + step]
        if vertical_first:
            x = _resample(x, kv, 1)
        if kh is not None:
            x = _resample(x, kh, 2)
        if kv is not None and not vertical_first:
            x = _resample(x, kv, 1)
        dct = scipy.fftpack.dct(scipy.fftpack.dct(x, axis=1), axis=2)
        low = dct[:, :HASH_SIZE, :HASH_SIZE].reshape(len(x), -1)
        bits = low > np.median(low, axis=1, keepdims=True)
        out[s:s + step] = np.packbits(bits, axis=1).view(">u8")[:, 0]  # first bit most significant
    return out


def phash(images: torch.Tensor) -> np.ndarray:
    """uint64 (N,) perceptual hashes of uint8 (N, C, H, W) images or (N, C, H, W, D) volumes."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim not in (4, 5):
        raise ValueError(f"phash needs uint8 (N, C, H, W) images or (N, C, H, W, D) volumes, "
                         f"got {x.dtype} {tuple(x.shape)}")
    step = max(1, _CHUNK_PIXELS // max(math.prod(x.shape[1:4]), 1))  # batches: RGB -> grey needs uint32
    out = [phash_grey(grey_images(x[s:s + step])) for s in range(0, len(x), step)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


def dataset_hashes(ds, *, batch: int = 512) -> np.ndarray:
    """The pHashes of a dataset: an in-memory one at once; a file-backed one (``FileDataset``) by
    decoding its files in batches (minutes for 100k JPEGs)."""
    if hasattr(ds, "images"):
        return phash(ds.images)
    out = []
    for s in range(0, len(ds), batch):
        out.append(phash(torch.stack([ds[i][0] for i in range(s, min(s + batch, len(ds)))])))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


# ---------------------------------------------------------------- near-duplicate search

def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, as uint8."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # older numpy: per byte
    return table[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(-1, dtype=np.uint8)


def _pairs_in_groups(h: np.ndarray, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                     threshold: int) -> List[np.ndarray]:
    """Pairs (i < j) of positions in ``h`` within ``threshold``, among the members of each group
    (group g is ``order[starts[g]:starts[g] + sizes[g]]``)."""
    found = []
    small = sizes <= 64
    for s in np.unique(sizes[small]):  # all groups of one size at once: their upper triangles
        st = starts[small & (sizes == s)]
        a, b = np.triu_indices(int(s), 1)
        i, j = order[st[:, None] + a].ravel(), order[st[:, None] + b].ravel()
        keep = popcount(h[i] ^ h[j]) <= threshold
        found.append(np.stack([i[keep], j[keep]], 1))
    for st, s in zip(starts[~small], sizes[~small]):  # a large group: blocks of rows against all
        members = np.sort(order[st:st + s])
        hm = h[members]
        rows = max(1, (1 << 22) // int(s))  # blocks of ~4M distances
        for r in range(0, s, rows):
            d = popcount(hm[r:r + rows, None] ^ hm[None, :])
            ri, ci = np.nonzero(d <= threshold)
            ri = ri + r
            keep = ci > ri
            found.append(np.stack([members[ri[keep]], members[ci[keep]]], 1))
    return found


def near_pairs(h: np.ndarray, threshold: int) -> np.ndarray:
    """All pairs (i < j) of positions with ``0 < hamming(h[i], h[j]) <= threshold``, as int64 (E, 2);
    ``h`` holds distinct uint64 hashes."""
    h = np.asarray(h, dtype=np.uint64)
    if threshold < 1 or len(h) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    edges = np.linspace(0, 64, threshold + 2).astype(int)  # t + 1 chunks of bits
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        sizes = np.diff(np.r_[starts, len(k)])
        multi = sizes > 1
        found += _pairs_in_groups(h, order, starts[multi], sizes[multi], threshold)
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    pairs = np.sort(pairs, axis=1)
    code = np.unique(pairs[:, 0] * len(h) + pairs[:, 1])  # the same pair found through several chunks
    return np.stack([code // len(h), code % len(h)], 1)


@dataclass
class Duplicates:
    """Near-duplicate structure of N items: ``group[i]`` is item i's group id (equal ids = connected
    by a chain of near-duplicates); ``in_group[i]`` whether i has any near-duplicate;
    ``pairs`` the number of item pairs within the threshold; ``groups`` the number of groups with
    more than one item."""

    threshold: int
    group: np.ndarray
    in_group: np.ndarray
    pairs: int
    groups: int
    hash_index: np.ndarray  # item -> index of its distinct hash
    hash_edges: np.ndarray  # (E, 2) near pairs among distinct hashes


def duplicate_groups(hashes: np.ndarray, threshold: int = DEFAULT_THRESHOLD) -> Duplicates:
    """Group ``hashes`` (uint64 pHashes) by Hamming distance <= ``threshold``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    threshold = check_threshold(threshold)
    uniq, inv, counts = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True, return_counts=True)
    e = near_pairs(uniq, int(threshold))
    n = len(uniq)
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)) if n else coo_matrix((0, 0))
    _, comp = connected_components(graph, directed=False) if n else (0, np.zeros(0, dtype=np.int64))
    size = np.bincount(comp[inv], minlength=len(comp)) if n else np.zeros(0, dtype=np.int64)
    group = comp[inv].astype(np.int64)
    pairs = int((counts * (counts - 1) // 2).sum() + (counts[e[:, 0]] * counts[e[:, 1]]).sum())
    return Duplicates(int(threshold), group, size[group] > 1, pairs, int((size > 1).sum()), inv.astype(np.int64), e)


def _has_neighbour_in(dup: Duplicates, member: np.ndarray) -> np.ndarray:
    """For every item: whether some *other* item with ``member`` set is within the threshold."""
    n_hash = int(dup.hash_index.max()) + 1 if len(dup.hash_index) else 0
    count = np.bincount(dup.hash_index[member], minlength=n_hash)  # members per distinct hash
    near = np.zeros(n_hash, dtype=bool)
    a, b = dup.hash_edges[:, 0], dup.hash_edges[:, 1]
    near[a[count[b] > 0]] = True
    near[b[count[a] > 0]] = True
    same = count[dup.hash_index] - member.astype(np.int64) > 0  # an identical hash other than itself
    return near[dup.hash_index] | same


def leakage(dup: Duplicates, parts: Dict[str, np.ndarray]) -> Dict[str, int]:
    """Crossings of a split: ``cross_a_b`` = how many items of part b have a near-duplicate in part a
    (e.g. ``cross_train_test``: test items with a near-duplicate among the training items).
    ``parts`` maps part names to item indices (into the items ``dup`` was built from)."""
    n = len(dup.group)
    masks = {}
    for name, idx in parts.items():
        m = np.zeros(n, dtype=bool)
        m[np.asarray(idx, dtype=np.int64)] = True
        masks[name] = m
    out = {}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        if a in masks and b in masks:
            out[f"cross_{a}_{b}"] = int((_has_neighbour_in(dup, masks[a]) & masks[b]).sum())
    return out


def dedupe_keep(dup: Duplicates, fixed: Optional[np.ndarray] = None) -> np.ndarray:
    """Which items a deduplicated dataset keeps (bool (N,)), so that no two kept items are
    near-duplicates (except two ``fixed`` ones). Every ``fixed`` item (an official test set, which
    must not change) is kept; then, in index order, an item is kept unless it is within the threshold
    of an item kept before it. This greedy pass keeps more than one item per group where a group is a
    chain (a ~ b ~ c with a and c far apart keeps a and c) and is deterministic."""
    from scipy.sparse import coo_matrix

    n = len(dup.group)
    fixed = np.zeros(n, dtype=bool) if fixed is None else np.asarray(fixed, dtype=bool)
    if fixed.shape != (n,):
        raise ValueError(f"fixed must be a bool mask of the {n} items, got shape {fixed.shape}")
    node = dup.hash_index  # items with equal hashes are one node of the near-duplicate graph
    n_node = int(node.max()) + 1 if n else 0
    e = dup.hash_edges
    adj = coo_matrix((np.ones(2 * len(e), dtype=bool), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])),
                     shape=(n_node, n_node)).tocsr()
    taken = np.zeros(n_node, dtype=bool)  # the node holds a kept item
    taken[node[fixed]] = True
    keep = fixed.copy()
    free = np.flatnonzero(~fixed)
    first = np.full(n_node, -1, dtype=np.int64)
    first[node[free[::-1]]] = free[::-1]  # each node's lowest non-fixed item
    leaders = free[first[node[free]] == free]
    isolated = np.diff(adj.indptr)[node[leaders]] == 0
    lone = leaders[isolated]  # no near neighbour: kept unless its hash is a fixed item's
    keep[lone] = ~taken[node[lone]]
    for i in leaders[~isolated]:  # a plain Python loop: each decision depends on the ones before
        u = node[i]
        if not taken[u] and not taken[adj.indices[adj.indptr[u]:adj.indptr[u + 1]]].any():
            taken[u] = keep[i] = True
    return keep


# ---------------------------------------------------------------- the split's record

def check_threshold(threshold) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not 0 <= threshold <= 16:
        raise ValueError(f"dedupe threshold must be an int in [0, 16] (Hamming distance between 64-bit "
                         f"pHashes), got {threshold!r}")
    return int(threshold)


def bundle_duplicates(bundle, threshold: int, *, streamed: bool) -> Optional[Duplicates]:
    """Near-duplicates among ``bundle.train`` items (indices 0..N-1) followed by its official test
    items (N..N+M-1). File-backed datasets are hashed only when ``streamed`` is true (decoding every
    file); otherwise None."""
    sets = [bundle.train] + ([bundle.test] if bundle.test is not None else [])
    if not streamed and not all(hasattr(ds, "images") for ds in sets):
        return None
    return duplicate_groups(np.concatenate([dataset_hashes(ds) for ds in sets]), threshold)


def leakage_record(dup: Optional[Duplicates], threshold: int, parts: Dict[str, np.ndarray],
                   removed: int = 0) -> Dict[str, object]:
    """split.json's ``leakage``: ``pairs`` (item pairs within the threshold), ``groups`` (connected
    groups of near-duplicates), ``duplicates`` (items with at least one near-duplicate), the
    crossings of the split (see :func:`leakage`) and ``removed`` (training-pool items that
    ``data.dedupe`` dropped before splitting)."""
    rec: Dict[str, object] = {"method": "phash", "threshold": threshold}
    if dup is None:
        rec["skipped"] = "streamed (file-backed) dataset; data.dedupe=true hashes every file and checks it"
        return rec
    rec.update(pairs=dup.pairs, groups=dup.groups, duplicates=int(dup.in_group.sum()))
    rec.update(leakage(dup, parts))
    rec["removed"] = int(removed)
    return rec


def leakage_line(split_json: Dict[str, object]) -> str:
    """One sentence on the leakage check of a split (``split.json``'s content), for the report."""
    rec = split_json.get("leakage") if isinstance(split_json, dict) else None
    if not rec:
        return "Leakage check: not recorded for this split."
    head = f"Leakage check (pHash, Hamming distance <= {rec.get('threshold')})"
    if "skipped" in rec:
        return f"{head}: skipped ({rec['skipped']})."
    boundary = ", ".join(f"{rec[k]:,} {k.split('_')[2]} images have a near-duplicate in {k.split('_')[1]}"
                         for k in ("cross_train_test", "cross_train_val", "cross_val_test") if k in rec)
    text = (f"{head}: {rec['duplicates']:,} images have a near-duplicate ({rec['pairs']:,} pairs in "
            f"{rec['groups']:,} groups); {boundary}")
    if rec.get("removed"):
        text += f"; data.dedupe removed {rec['removed']:,} training-pool images before splitting"
    return text + "."
