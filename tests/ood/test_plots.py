"""The plots are written as valid, non-empty PNG files without opening pyplot figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ddpm_ood.ood.plots import plot_auroc_per_t, plot_roc_curves, plot_zscore_vs_t
from ddpm_ood.ood.zscore import SCORE_NAMES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TS = [1, 11, 21, 31]


def assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert im.width > 0 and im.height > 0
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file


def z_frame(prefix, n, shift, seed):
    rng = np.random.default_rng(seed)
    rows = [{"filename": f"{prefix}{i}", "t": t, **{s: rng.normal(shift, 1) for s in SCORE_NAMES}}
            for i in range(n) for t in TS]
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before  # nothing registered with pyplot, nothing left open


def test_roc_curves_png(tmp_path):
    rng = np.random.default_rng(0)
    path = plot_roc_curves(rng.normal(size=30), {"A": rng.normal(1, 1, 20), "B": rng.normal(3, 1, 25)},
                           tmp_path / "roc_curves.png", title="m")
    assert_png(path)


def test_auroc_per_t_png(tmp_path):
    per_t = pd.DataFrame([{"out_set": o, "t": t, "metric": m, "auroc": 0.5 + 0.01 * t}
                          for o in ("A", "B") for t in TS for m in SCORE_NAMES])
    assert_png(plot_auroc_per_t(per_t, tmp_path / "auroc_per_t.png"))


def test_zscore_vs_t_png_and_seeded_sample(tmp_path):
    in_z = z_frame("i", 80, 0.0, 1)  # more than the 50-image sample
    out_z = {"A": z_frame("a", 60, 2.0, 2), "B": z_frame("b", 10, 1.0, 3), "C": z_frame("c", 5, 1.0, 4),
             "D": z_frame("d", 5, -1.0, 5)}
    p1 = plot_zscore_vs_t(in_z, out_z, tmp_path / "z1.png", seed=2)
    p2 = plot_zscore_vs_t(in_z, out_z, tmp_path / "z2.png", seed=2)
    p3 = plot_zscore_vs_t(in_z, out_z, tmp_path / "z3.png", seed=3)
    for p in (p1, p2, p3):
        assert_png(p)
    # Same seed -> same sample -> the same pixels; another seed draws other images.
    with Image.open(p1) as a, Image.open(p2) as b, Image.open(p3) as c:
        pa, pb, pc = (np.asarray(im.convert("RGB")) for im in (a, b, c))
    assert np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)
