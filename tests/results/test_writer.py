"""ResumableResults: finished files are skipped only under the same settings (legacy sidecars included), and a
fault between the final CSV and its sidecar never leaves new rows beside old settings."""

from __future__ import annotations

import errno
import json
import os

import pytest

from ddpm_ood.results.writer import ResumableResults, read_settings

SETTINGS = {"seed": 2, "precision": "fp32", "start_timesteps": [1, 501]}


def _finish(path, settings) -> ResumableResults:
    writer = ResumableResults(path, settings, n_timesteps=2)
    assert writer.start() == set()
    writer.append([{"index": 0, "filename": "a", "type": "val", "t": t, "perceptual_difference": 0.1, "mse": 0.2}
                   for t in (1, 501)])
    writer.finish()
    return writer


def test_a_legacy_amp_false_sidecar_is_fp32_and_not_recomputed(tmp_path):
    writer = _finish(tmp_path / "results_val.csv", SETTINGS)
    legacy = {k: v for k, v in SETTINGS.items() if k != "precision"} | {"amp": False}
    writer.settings_path.write_text(json.dumps(legacy))
    assert read_settings(writer.settings_path) == SETTINGS
    assert ResumableResults(writer.path, SETTINGS, 2).is_complete()


def test_a_legacy_amp_true_sidecar_matches_no_precision(tmp_path, capsys):
    writer = _finish(tmp_path / "results_val.csv", SETTINGS)
    legacy = {k: v for k, v in SETTINGS.items() if k != "precision"} | {"amp": True}
    writer.settings_path.write_text(json.dumps(legacy))
    for precision in ("fp32", "bf16"):
        assert not ResumableResults(writer.path, SETTINGS | {"precision": precision}, 2).is_complete()
    assert "amp: True -> absent" in capsys.readouterr().out


def test_fault_between_csv_and_sidecar_leaves_no_stale_sidecar(tmp_path, monkeypatch):
    writer = _finish(tmp_path / "results_val.csv", SETTINGS)
    bf16 = SETTINGS | {"precision": "bf16"}
    redo = ResumableResults(writer.path, bf16, 2)
    assert not redo.is_complete()
    redo.start()
    redo.append([{"index": 0, "filename": "a", "type": "val", "t": t, "perceptual_difference": 0.3, "mse": 0.4}
                 for t in (1, 501)])
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".results_val.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        redo.finish()
    # The bf16 CSV is in place; the fp32 sidecar is gone, so nothing takes the file for fp32 (or bf16) results.
    assert "0.4" in writer.path.read_text()
    assert not writer.settings_path.exists()
    assert not ResumableResults(writer.path, SETTINGS, 2).is_complete()
    assert not ResumableResults(writer.path, bf16, 2).is_complete()


def test_noise_type_is_recorded_unless_gaussian_and_another_type_is_recomputed(tmp_path, capsys):
    from ddpm_ood.results.writer import ReconSettings, reconstruction_settings

    common = dict(checkpoint=tmp_path / "c.pth", checkpoint_epoch=1, csv="v.csv", first_n=None, seed=2,
                  num_inference_steps=10, inference_skip_factor=4, recon_steps=None, start_timesteps=[1, 501],
                  use_ema=True, precision="fp32", noise_key="file stem")
    gaussian = reconstruction_settings(**common)
    simplex = reconstruction_settings(**common, noise_type="simplex")
    assert "noise_type" not in gaussian  # Gaussian sidecars are what they were before noise types existed
    assert simplex == gaussian | {"noise_type": "simplex"}
    writer = _finish(tmp_path / "results_val.csv", gaussian)
    assert ReconSettings.read(writer.settings_path).noise_type == "gaussian"
    assert ResumableResults(writer.path, gaussian, 2).is_complete()
    assert not ResumableResults(writer.path, simplex, 2).is_complete()
    assert "noise_type: absent -> simplex" in capsys.readouterr().out
    writer = _finish(tmp_path / "results_in.csv", simplex)
    assert ReconSettings.read(writer.settings_path).noise_type == "simplex"


def test_settings_an_older_sidecar_lacks_take_their_field_defaults_and_given_ones_are_read(tmp_path):
    from ddpm_ood.results.writer import FeatureSettings, ReconSettings, reconstruction_settings
    from ddpm_ood.seeding import NOISE_KEY_RULE

    run = dict(checkpoint="c.pth", checkpoint_epoch=1, seed=2, use_ema=True, precision="fp32", noise_key=NOISE_KEY_RULE)
    recon = reconstruction_settings(**run, csv="v.csv", first_n=None, num_inference_steps=10, inference_skip_factor=4,
                                    recon_steps=None, start_timesteps=[1, 501])
    feature = run | {"family": "eps_norm", "noise_type": "gaussian", "nfe": 3, "settings": {"levels": [1, 2]}}
    given = {"autoencoder": "ab12", "pretrained": {"weights_sha256": "cd34"}}
    for settings_type, record, extra in ((ReconSettings, recon, given | {"noise_type": "simplex",
                                                                         "recon_noise": "shared"}),
                                         (FeatureSettings, feature, given)):
        path = tmp_path / f"{settings_type.__name__}.json"
        path.write_text(json.dumps(record))
        old = settings_type.read(path)
        assert {k: getattr(old, k) for k in extra} == {k: settings_type.__dataclass_fields__[k].default for k in extra}
        path.write_text(json.dumps(record | extra))
        new = settings_type.read(path)
        assert {k: getattr(new, k) for k in extra} == extra
