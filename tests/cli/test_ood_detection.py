"""ood_detection.py end to end on synthetic results files, checked against pandas + sklearn computed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from tiny_run import REPO_ROOT

from ddpm_ood.cli.ood_detection import OUTPUT_FILES, main
from ddpm_ood.cli.runner import run_cli

REPO = REPO_ROOT
TS = [1, 11, 21, 31, 41, 51]
SCORES = ["mse+perceptual", "mse", "perceptual"]
SUMMARY_COLS = ["out_set", "score", "auroc", "fpr95", "aupr_in", "aupr_out", "n_in", "n_out", "nfe"]


def make_results(prefix, kind, n, shift=0.0, seed=0, ts=TS):
    rng = np.random.default_rng(seed)
    return pd.DataFrame([
        {"filename": f"{prefix}_{i}", "type": kind, "t": t,
         "perceptual_difference": rng.normal(0.3 + shift + t / 500, 0.05),
         "mse": rng.normal(0.03 + shift / 5 + t / 5000, 0.01)}
        for i in range(n) for t in ts
    ])


def write_run(root: Path, model="m1", sets=None, upstream_index=True) -> Path:
    """results_{val,in,<out>}.csv under root/model/ood; upstream wrote the pandas index as a first column."""
    if sets is None:
        sets = {"val": make_results("v", "val", 10, seed=1), "in": make_results("x", "in", 12, seed=2),
                "MNIST": make_results("y", "out", 9, shift=0.1, seed=3),
                "MNIST_vflip": make_results("x", "out", 11, shift=0.02, seed=4)}
    d = root / model / "ood"
    d.mkdir(parents=True, exist_ok=True)
    for name, df in sets.items():
        df.to_csv(d / f"results_{name}.csv", index=upstream_index)
    return d


def read(d: Path, name: str) -> pd.DataFrame:
    df = pd.read_csv(d / f"results_{name}.csv")
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed")])  # upstream's index column
    return df.drop_duplicates(["filename", "t"])


def expected_scores(val: pd.DataFrame, df: pd.DataFrame, ts) -> pd.DataFrame:
    """Upstream's recipe (merge per-t val mean/std, z, mean over t) with all three score choices."""
    cols = ["mse", "perceptual_difference"]
    val, df = val[val["t"].isin(ts)], df[df["t"].isin(ts)]
    stats = val.groupby("t")[cols].agg(["mean", "std"])
    stats.columns = [f"{a}_{b}" for a, b in stats.columns]
    m = df.merge(stats.reset_index(), on="t")
    zm = (m["mse"] - m["mse_mean"]) / m["mse_std"]
    zp = (m["perceptual_difference"] - m["perceptual_difference_mean"]) / m["perceptual_difference_std"]
    z = pd.DataFrame({"filename": m["filename"], "mse+perceptual": zm + zp, "mse": zm, "perceptual": zp})
    return z.groupby("filename").mean()


def brute_fpr95(s_in, s_out):
    ok = [(s_in >= thr).mean() for thr in np.unique(np.r_[s_in, s_out]) if 100 * (s_out >= thr).sum() >= 95 * len(s_out)]
    return min(ok)


def expected_summary(d: Path, out_sets, ts) -> dict:
    val, inn = read(d, "val"), read(d, "in")
    s_in = expected_scores(val, inn, ts)
    rows = {}
    for o in out_sets:
        s_out = expected_scores(val, read(d, o), ts)
        for s in SCORES:
            a, b = s_in[s].to_numpy(), s_out[s].to_numpy()
            y = np.r_[np.zeros(len(a)), np.ones(len(b))]
            x = np.r_[a, b]
            rows[o, s] = {"auroc": roc_auc_score(y, x), "fpr95": brute_fpr95(a, b),
                          "aupr_in": average_precision_score(1 - y, -x), "aupr_out": average_precision_score(y, x),
                          "n_in": len(a), "n_out": len(b)}
    return rows


def check_summary(d: Path, out_sets, ts):
    got = pd.read_csv(d / "summary.csv")
    assert list(got.columns) == SUMMARY_COLS
    want = expected_summary(d, out_sets, ts)
    assert sorted(zip(got["out_set"], got["score"], strict=True)) == sorted(want)
    for row in got.itertuples():
        w = want[row.out_set, row.score]
        for k in ("auroc", "fpr95", "aupr_in", "aupr_out"):
            assert getattr(row, k) == pytest.approx(w[k], abs=1e-9), (row.out_set, row.score, k)
            assert 0 <= getattr(row, k) <= 1
        assert (row.n_in, row.n_out) == (w["n_in"], w["n_out"])
        assert row.nfe == 0  # results without a settings sidecar (as upstream wrote them): evaluations unknown
    return got, want


def auc_lines(text: str) -> dict[str, float]:
    return {line.split(" vs ")[1].split(":")[0]: float(line.rsplit(": ", 1)[1])
            for line in text.splitlines() if line.startswith("AUC for ")}


def test_root_script_end_to_end_on_upstream_files(tmp_path):
    d = write_run(tmp_path, "m1")
    proc = subprocess.run([sys.executable, "ood_detection.py", f"--output_dir={tmp_path}", "--model_name=m1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # Exactly the expected files (no temp files left behind).
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [f"results_{n}.csv" for n in ("val", "in", "MNIST", "MNIST_vflip")] + list(OUTPUT_FILES))
    _, want = check_summary(d, ["MNIST", "MNIST_vflip"], TS)
    lines = proc.stdout.splitlines()
    assert lines[0] == "n_val=10 n_in=12 n_out=9" and lines[1] == "n_val=10 n_in=12 n_out=11"
    aucs = auc_lines(proc.stdout)
    assert list(aucs) == ["MNIST", "MNIST_vflip"]  # sorted out-set names, found from the files present
    for o, v in aucs.items():
        assert v == pytest.approx(round(100 * want[o, "mse+perceptual"]["auroc"], 1))
    avg = np.mean([100 * want[o, "mse+perceptual"]["auroc"] for o in aucs])
    assert f"Average AUC: {avg:.1f}" in lines
    assert "auroc" in proc.stdout and str(d) in proc.stdout


def test_summary_json_per_t_and_score_flag(tmp_path, capsys):
    d = write_run(tmp_path, "m1", upstream_index=False)
    assert main([f"--output_dir={tmp_path}", "--model_name=m1", "--score=mse"]) == 0
    out = capsys.readouterr().out
    got, want = check_summary(d, ["MNIST", "MNIST_vflip"], TS)
    assert auc_lines(out) == {o: pytest.approx(round(100 * want[o, "mse"]["auroc"], 1)) for o in ("MNIST", "MNIST_vflip")}

    info = json.loads((d / "summary.json").read_text())
    assert info["t_values"] == TS and info["n_val"] == 10
    assert info["settings"] == {"min_t": 0, "max_t": 1000, "t_skip": 1, "score": "mse",
                                "out_sets": ["MNIST", "MNIST_vflip"], "seed": 2}
    in_json = pd.DataFrame(info["summary"])
    assert list(in_json.columns) == SUMMARY_COLS
    pd.testing.assert_frame_equal(in_json, got, check_exact=False, rtol=1e-12)

    per_t = pd.read_csv(d / "auroc_per_t.csv")
    assert list(per_t.columns) == ["out_set", "t", "metric", "auroc"]
    assert len(per_t) == 2 * len(TS) * 3
    val, inn = read(d, "val"), read(d, "in")
    for row in per_t.sample(8, random_state=0).itertuples():
        # A single t: the per-t score is the image score computed with that t alone.
        a = expected_scores(val, inn, [row.t])[row.metric]
        b = expected_scores(val, read(d, row.out_set), [row.t])[row.metric]
        assert row.auroc == pytest.approx(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))


def test_t_window_and_skip(tmp_path, capsys):
    d = write_run(tmp_path, "m1")
    assert main([f"--output_dir={tmp_path}", "--model_name=m1", "--min_t=1", "--max_t=51"]) == 0
    assert json.loads((d / "summary.json").read_text())["t_values"] == [11, 21, 31, 41]  # strict on both ends
    check_summary(d, ["MNIST", "MNIST_vflip"], [11, 21, 31, 41])
    assert main([f"--output_dir={tmp_path}", "--model_name=m1", "--t_skip=2"]) == 0
    assert json.loads((d / "summary.json").read_text())["t_values"] == [1, 21, 41]
    check_summary(d, ["MNIST", "MNIST_vflip"], [1, 21, 41])
    assert len(pd.read_csv(d / "auroc_per_t.csv")) == 2 * 3 * 3


def test_duplicates_dropped_keep_first(tmp_path, capsys):
    sets = {"val": make_results("v", "val", 8, seed=1), "in": make_results("x", "in", 7, seed=2),
            "SVHN": make_results("y", "out", 6, shift=0.05, seed=3)}
    # DDP padding repeats rows; the later copies (garbage here) must be ignored.
    for name in sets:
        sets[name] = pd.concat([sets[name], sets[name].iloc[:9].assign(mse=50.0)], ignore_index=True)
    d = write_run(tmp_path, "m1", sets)
    assert main([f"--output_dir={tmp_path}", "--model_name=m1"]) == 0
    got, _ = check_summary(d, ["SVHN"], TS)
    assert (got["n_in"] == 7).all() and (got["n_out"] == 6).all()


def test_separated_and_identical_sets(tmp_path, capsys):
    inn = make_results("x", "in", 10, seed=2)
    sets = {"val": make_results("v", "val", 10, seed=1), "in": inn,
            "Far": make_results("y", "out", 10, shift=5.0, seed=3),
            "Same": inn.assign(filename=inn["filename"] + "_copy", type="out")}
    d = write_run(tmp_path, "m1", sets)
    assert main([f"--output_dir={tmp_path}", "--model_name=m1"]) == 0
    got = pd.read_csv(d / "summary.csv").set_index(["out_set", "score"])
    for s in SCORES:
        assert got.loc[("Far", s), "auroc"] == 1.0 and got.loc[("Far", s), "fpr95"] == 0.0
        assert got.loc[("Same", s), "auroc"] == 0.5


def test_out_sets_subset_and_model_list(tmp_path, capsys):
    d1 = write_run(tmp_path, "m1")
    d2 = write_run(tmp_path, "m2")
    assert main([f"--output_dir={tmp_path}", "--model_name=m1,m2", "--out_sets=MNIST_vflip"]) == 0
    out = capsys.readouterr().out
    assert out.count("AUC for m1 vs MNIST_vflip") == 1 and out.count("AUC for m2 vs MNIST_vflip") == 1
    assert "vs MNIST:" not in out
    for d in (d1, d2):
        assert set(pd.read_csv(d / "summary.csv")["out_set"]) == {"MNIST_vflip"}
        assert set(pd.read_csv(d / "auroc_per_t.csv")["out_set"]) == {"MNIST_vflip"}


def run_error(argv, capsys) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs(tmp_path, capsys):
    base = [f"--output_dir={tmp_path}"]
    assert "results directory not found" in run_error(base + ["--model_name=nope"], capsys)

    d = write_run(tmp_path, "m1")
    assert "--out_sets" in (e := run_error(base + ["--model_name=m1", "--out_sets=CIFAR10"], capsys))
    assert "CIFAR10" in e and "MNIST, MNIST_vflip" in e
    assert "--min_t" in run_error(base + ["--model_name=m1", "--min_t=500", "--max_t=100"], capsys)
    assert "--t_skip" in run_error(base + ["--model_name=m1", "--min_t=45", "--max_t=50"], capsys)

    (d / "results_in.csv").unlink()
    assert "results_in.csv" in run_error(base + ["--model_name=m1"], capsys)
    (d / "results_val.csv").unlink()
    assert "results_val.csv" in run_error(base + ["--model_name=m1"], capsys)


def test_bad_files(tmp_path, capsys):
    base = [f"--output_dir={tmp_path}", "--model_name=m1"]
    val, inn = make_results("v", "val", 6, seed=1), make_results("x", "in", 5, seed=2)

    write_run(tmp_path, "m1", {"val": val, "in": inn})
    assert "no out-set results" in run_error(base, capsys)

    write_run(tmp_path, "m1", {"val": val.drop(columns="mse"), "in": inn, "A": inn})
    assert "results_val.csv" in (e := run_error(base, capsys)) and "mse" in e

    write_run(tmp_path, "m1", {"val": val, "in": inn, "A": make_results("y", "out", 4, ts=TS + [61])})
    assert "results_A.csv" in (e := run_error(base, capsys)) and "t=61" in e

    write_run(tmp_path, "m1", {"val": val, "in": inn, "A": make_results("y", "out", 4, ts=TS[:-1])})
    assert "results_A.csv: image y_0 lacks start t=51" in run_error(base, capsys)

    write_run(tmp_path, "m1", {"val": make_results("v", "val", 1, seed=1), "in": inn, "A": inn})
    assert "results_val.csv" in (e := run_error(base, capsys)) and "t=1" in e and "std" in e


def test_results_made_at_different_precisions_are_refused(tmp_path, capsys):
    d = write_run(tmp_path, "m1", upstream_index=False)
    for name in ("val", "in", "MNIST", "MNIST_vflip"):
        (d / f"results_{name}.json").write_text(json.dumps({"precision": "bf16"}))
    assert main([f"--output_dir={tmp_path}", "--model_name=m1"]) == 0
    assert json.loads((d / "summary.json").read_text())["precision"] == "bf16"
    (d / "results_MNIST.json").write_text(json.dumps({"amp": False}))  # written before precision was named: fp32
    capsys.readouterr()
    assert run_cli(main, [f"--output_dir={tmp_path}", "--model_name=m1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results_MNIST.json: not comparable with results_val.json (precision: bf16 -> fp32)" in err[0]
