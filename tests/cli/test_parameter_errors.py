"""Library errors name the parameter; the command line's boundary (cli/runner.py) names the flag (issue 31)."""

from __future__ import annotations

import pickle

import pytest

from ddpm_ood.cli.runner import flag_message, run_cli
from ddpm_ood.errors import ParameterError, UserError
from ddpm_ood.ood.scorer import OODScorer
from ddpm_ood.ood.stage import DetectionJob
from ddpm_ood.ood.zscore import select_timesteps
from ddpm_ood.reconstruction.engine import trajectory_timesteps
from ddpm_ood.reconstruction.stage import SetSelection
from ddpm_ood.training.loop import TrainConfig
from ddpm_ood.training.vqvae import VQVAELossConfig


def _raised(call) -> ParameterError:
    with pytest.raises(ParameterError) as raised:
        call()
    assert "--" not in str(raised.value), str(raised.value)
    return raised.value


@pytest.mark.parametrize("call, library, cli", [
    (lambda: OODScorer.from_run("nowhere", "run", val_keep=2),
     "val_keep must be in (0, 1] (the fraction of validation images kept), got 2",
     "--val_keep must be in (0, 1] (the fraction of validation images kept), got 2"),
    (lambda: DetectionJob("out", ("run",), min_t=5, max_t=3),
     "min_t=5 must be below max_t=3 (the window is min_t < t < max_t)",
     "--min_t=5 must be below --max_t=3 (the window is min_t < t < max_t)"),
    (lambda: select_timesteps([1, 11, 21], min_t=30, max_t=40, t_skip=2),
     "no start t left: validation has t=1,11,21, and t_skip=2 with min_t=30 < t < max_t=40 keeps none",
     "no start t left: validation has t=1,11,21, and --t_skip=2 with --min_t=30 < t < --max_t=40 keeps none"),
    (lambda: SetSelection().planned(),
     "run_val=1 needs validation_ids", "--run_val=1 needs --validation_ids"),
    (lambda: SetSelection(run_val=False, run_in=False, run_out=False).planned(),
     "nothing to do: run_val, run_in and run_out are all 0",
     "nothing to do: --run_val, --run_in and --run_out are all 0"),
    (lambda: TrainConfig(run_dir="r", resume_epoch=0),
     "resume_epoch must be >= 1, got 0", "--ddpm_checkpoint_epoch must be >= 1, got 0"),
    (lambda: TrainConfig(run_dir="r", n_epochs=0),
     "n_epochs, eval_freq and batch_size must be >= 1", "--n_epochs, --eval_freq and --batch_size must be >= 1"),
    (lambda: VQVAELossConfig(adversarial_weight=-1),
     "adversarial_weight and perceptual_weight must be >= 0",
     "--adversarial_weight and --perceptual_weight must be >= 0"),
])
def test_the_library_names_the_parameter_and_the_cli_the_flag(call, library, cli):
    exc = _raised(call)
    assert str(exc) == library
    assert flag_message(exc) == cli


def test_recon_steps_names_the_parameter():
    exc = _raised(lambda: trajectory_timesteps(901, 100, recon_steps=0))
    assert str(exc).startswith("recon_steps must be >= 1") and flag_message(exc).startswith("--recon_steps must")


def test_only_the_first_whole_word_mention_becomes_the_flag():
    exc = ParameterError("val_keep=2: val_keeps, xval_keep, --val_keep, val_keep", "val_keep")
    assert flag_message(exc) == "--val_keep=2: val_keeps, xval_keep, --val_keep, val_keep"
    assert flag_message(ParameterError("spatial_dims must be 2 or 3", "spatial_dims")) == (
        "--spatial_dimension must be 2 or 3")
    assert flag_message(UserError("val_keep is a plain UserError")) == "val_keep is a plain UserError"


def test_a_parameter_error_pickles_with_its_parameters():
    exc = pickle.loads(pickle.dumps(ParameterError("lr must be > 0", "lr")))
    assert isinstance(exc, UserError) and exc.params == ("lr",) and flag_message(exc) == "--lr must be > 0"


def test_the_error_boundary_prints_the_flag(capsys):
    def main(argv):
        OODScorer.from_run("nowhere", "run", val_keep=1.5)

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err == (
        "error: --val_keep must be in (0, 1] (the fraction of validation images kept), got 1.5\n")
