#!/usr/bin/env python3
"""Soak test of exact resume: SIGKILL a small run at N random moments, resume after each kill, and
check the result equals an uninterrupted run bit for bit (weights, metrics, test results).

    python scripts/soak_resume.py                 # 20 kills, one kill per resumed run (20 runs)
    python scripts/soak_resume.py --kills 20 --runs 4

Exit status 1 if any killed run differs from the reference."""
import argparse
import sys
import tempfile
from pathlib import Path

from vitlab.soak import soak

SMALL = ["data.name=synthetic", "data.options.num_classes=4", "data.options.img_size=16",
         "data.options.n_train=6144", "data.options.n_test=128", "model.patch_size=4", "model.dim=64",
         "model.depth=3", "model.heads=2", "model.qk_pe=rope_mixed", "model.token_pe=learned",
         "data.hflip=true", "data.crop_pad=2", "data.mixup=0.2", "data.random_erasing=0.25", "model.drop_path=0.1",
         "train.batch_size=32", "train.epochs=4", "train.ema=0.9", "train.threads=1",
         "train.checkpoint_every_min=0.002", "train.eval_batch_size=128"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--runs", type=int, default=0, help="killed runs to spread the kills over (default: one per kill)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vitlab-soak-"))
    res = soak(work, "fashion-mnist-quick", SMALL, a.kills, seed=a.seed, runs=a.runs or a.kills)
    print(f"{res['kills']} kills over {res['runs']} runs: {res['identical_runs']}/{res['runs']} runs resumed "
          f"identically to the uninterrupted run ({work})")
    sys.exit(0 if res["identical_runs"] == res["runs"] else 1)
