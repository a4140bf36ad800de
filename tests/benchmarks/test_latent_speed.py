"""benchmarks/latent_speed.py: a whole (tiny) side-by-side run prints both speeds and their ratio."""

from __future__ import annotations

import importlib.util
import re
import sys

from tiny_run import REPO_ROOT, needs_lpips, one_torch_thread

SCRIPT = REPO_ROOT / "benchmarks" / "latent_speed.py"


@needs_lpips
def test_side_by_side_run(capsys):
    spec = importlib.util.spec_from_file_location("latent_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        with one_torch_thread():
            assert module.main(["--batch_size=2", "--repeats=1", "--inference_skip_factor=50", "--recon_steps=2",
                                "--precision=fp32"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    out = capsys.readouterr().out
    values = {k: float(v) for k, v in re.findall(r"^(\w+_per_s|latent_vs_pixel): ([\d.]+)", out, re.M)}
    assert set(values) == {"pixel_images_per_s", "latent_images_per_s", "latent_vs_pixel"}
    assert abs(values["latent_vs_pixel"] - values["latent_images_per_s"] / values["pixel_images_per_s"]) < 0.02
    assert "latent 3x8x8" in out and out.strip().splitlines()[-1].startswith("latent_vs_pixel: ")
