"""benchmarks/checkpoint_cost.py: a whole (tiny) run prints the three settings' times and both ratios."""

from __future__ import annotations

import re

from tiny_run import benchmark_module, one_torch_thread


def test_side_by_side_run(capsys):
    with benchmark_module("checkpoint_cost.py") as module, one_torch_thread():
        # A short interval of ~0: a mid-epoch checkpoint after the first step of each run's only epoch.
        assert module.main(["--preset=tiny", "--image_size=8", "--batch_size=4", "--train_images=12",
                            "--epochs=1", "--repeats=1", "--short_minutes=1e-9"]) == 0
    out = capsys.readouterr().out
    values = dict(re.findall(r"^(\w+): ([\d.]+)$", out, re.M))
    assert set(values) == {"checkpoint_mb", "write_s", "write_share_of_default", "mid_epoch_checkpoints_short",
                           "mid_epoch_share_short", "mid_epoch_share_default", "ratio_short_vs_none",
                           "ratio_default_vs_none"}
    assert float(values["mid_epoch_checkpoints_short"]) >= 1 and float(values["mid_epoch_share_short"]) > 0
    assert float(values["mid_epoch_share_default"]) == 0  # a run of seconds: no checkpoint at the default 15 min
    assert re.search(r"^run 1 none \(0 min\): [\d.]+ s, 0 mid-epoch checkpoint\(s\) written in 0.000 s$", out, re.M)
    assert out.strip().splitlines()[-1].startswith("ratio_default_vs_none: ")
