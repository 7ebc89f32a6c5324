"""The fair comparison: real `dvc exp run --temp` experiments on the tiny pinned repository, and
its tables."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from benchmarks.compare import table
from mapet.registry.fingerprint import code_revision
from test_pretrain import tokens  # noqa: F401 (fixture)
from tests.tiny_repo import ROOT, make_pinned_repo, sh


def test_table_gives_mean_and_sample_spread_per_arm_then_every_run():
    records = [{"objective": "mapet", "init": "pretrained", "seed": s, "top1": t, "top5": 0.9, "knn_top1": 0.5,
                "linear_top1": 0.6, "loss": 2.0} for s, t in ((0, 0.70), (1, 0.74))]
    records.append({"objective": "none", "init": "scratch", "seed": 0, "top1": 0.6, "top5": 0.8, "knn_top1": 0.4,
                    "linear_top1": 0.5, "loss": None})
    lines = table(records).splitlines()
    assert lines[2] == "| mapet | 2 | 0.7200 +- 0.0283 | 0.9000 +- 0.0000 | 0.5000 +- 0.0000 | 0.6000 +- 0.0000 | " \
                       "2.0000 +- 0.0000 |"
    assert lines[3].startswith("| scratch | 1 | 0.6000 (one run) |") and lines[3].endswith("|  |")
    assert lines[-1] == "| none | scratch | 0 | 0.6000 | 0.8000 | 0.4000 | 0.5000 |  |"


@pytest.mark.slow
def test_compare_runs_each_arm_as_an_experiment_and_writes_the_tables(tmp_path):
    repo = make_pinned_repo(tmp_path, with_stages=True)
    sh(sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--seeds", "3", "--objectives", "plm", cwd=repo)
    assert sh("git", "status", "--porcelain", cwd=repo) == "?? reports/"       # the workspace is left as it was
    records = json.loads((repo / "reports" / "compare" / "results.json").read_text())
    assert [(r["objective"], r["init"], r["seed"]) for r in records] == [("plm", "pretrained", 3), ("none", "scratch", 3)]
    for r in records:
        assert set(r) == {"objective", "init", "seed", "code", "top1", "top5", "knn_top1", "linear_top1", "loss",
                          "pixels_knn_top1", "pixels_linear_top1"}
        assert r["code"] == code_revision()
        assert 0 <= r["top1"] <= r["top5"] <= 1 and 0 <= r["knn_top1"] <= 1 and 0 <= r["linear_top1"] <= 1
        assert 0 < r["pixels_linear_top1"] <= 1
    assert records[0]["loss"] > 0 and records[1]["loss"] is None
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo))
    names = {e.get("name") for entry in shown for e in entry.get("experiments") or []}
    assert {"cmp-plm-s3", "cmp-scratch-s3"} <= names
    params = {e["name"]: e["revs"][0]["data"]["params"]["params.yaml"]["data"]
              for entry in shown for e in entry.get("experiments") or [] if e.get("name")}
    assert params["cmp-scratch-s3"]["finetune"]["init"] == "scratch" and params["cmp-plm-s3"]["pretrain"]["seed"] == 3
    assert records[0]["pixels_linear_top1"] == records[1]["pixels_linear_top1"]          # the same data and probe
    report = (repo / "reports" / "compare" / "results.md").read_text()
    assert "| plm | 1 |" in report and f"linear {records[0]['pixels_linear_top1']:.4f}" in report
    assert "| top1 | plm - scratch | 1 |" in report and "one seed: no interval" in report


@pytest.mark.slow
def test_compare_direct_runs_the_stages_without_dvc(tokens, tmp_path):
    data, token_dir = tokens
    tiny = ["model.patch_size=4", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "pretrain.probe_every=0",
            "finetune.epochs=1", "pretrain.batch_size=16", "pretrain.micro_batch_size=16", "finetune.batch_size=16",
            "finetune.micro_batch_size=16", "probe.linear_iterations=20"]
    sh(sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--direct", str(tmp_path / "work"), "--data", str(data),
       "--tokens", str(token_dir), "--jobs", "2", "--seeds", "5", "--objectives", "mim", "--out", str(tmp_path / "out"),
       *(part for setting in tiny for part in ("--set", setting)), cwd=ROOT)
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["objective"], r["init"], r["seed"]) for r in records] == [("mim", "pretrained", 5), ("none", "scratch", 5)]
    assert records[0]["loss"] > 0 and records[1]["loss"] is None and all(0 <= r["top1"] <= 1 for r in records)
    params = (tmp_path / "work" / "cmp-mim-s5" / "params.yaml").read_text()
    assert "objective: mim" in params and "embed_dim: 32" in params
    assert not (tmp_path / "work" / "cmp-scratch-s5" / "outputs" / "pretrain").exists()    # scratch: no pre-training
    assert "| mim | 1 |" in (tmp_path / "out" / "results.md").read_text()


def test_paired_differences_give_the_t_interval_over_the_common_seeds():
    from benchmarks.compare import differences_table, paired_differences

    def run(objective, seed, top1):
        init = "scratch" if objective == "none" else "pretrained"
        return {"objective": objective, "init": init, "seed": seed, "top1": top1, "linear_top1": None}

    records = [run("mapet", s, t) for s, t in ((0, 0.80), (1, 0.82), (2, 0.81), (3, 0.90))]
    records += [run("plm", s, t) for s, t in ((0, 0.79), (1, 0.80), (2, 0.81))]
    records += [run("none", s, t) for s, t in ((0, 0.70), (1, 0.71), (2, 0.69), (3, 0.70))]
    rows = {row["pair"]: row for row in paired_differences(records, "top1")}
    assert set(rows) == {"mapet - plm", "mapet - scratch", "plm - scratch"}             # no mim: no mapet - mim
    plm = rows["mapet - plm"]
    assert plm["seeds"] == 3 and plm["differences"] == pytest.approx([0.01, 0.02, 0.0])  # seed 3: plm did not run
    # mean 0.01, sample sd 0.01, t(0.975, 2) = 4.3027: 0.01 +- 4.3027 * 0.01 / sqrt(3)
    assert (plm["mean"], plm["low"], plm["high"]) == pytest.approx((0.01, 0.01 - 0.024842, 0.01 + 0.024842), abs=1e-6)
    scratch = rows["mapet - scratch"]
    assert scratch["seeds"] == 4 and scratch["low"] > 0
    table = differences_table(records)
    assert "| top1 | mapet - plm | 3 | +1.00 | [-1.48, +3.48] | +1.0, +2.0, +0.0 | not resolved (the interval holds 0) |" \
        in table
    assert "| top1 | mapet - scratch | 4 |" in table and "mapet ahead |" in table and "linear_top1" not in table


def test_merge_keeps_the_runs_of_other_seeds(tmp_path):
    import argparse

    from benchmarks.compare import write_tables

    def run(objective, init, seed, top1):
        return {"objective": objective, "init": init, "seed": seed, "top1": top1, "top5": 1.0, "knn_top1": 0.5,
                "linear_top1": 0.5, "loss": None if init == "scratch" else 2.0}

    args = argparse.Namespace(out=tmp_path, merge=True, set=[], objectives=["mapet"])
    write_tables([run("mapet", "pretrained", 0, 0.70), run("none", "scratch", 0, 0.60)], args)
    write_tables([run("mapet", "pretrained", 1, 0.74), run("mapet", "pretrained", 0, 0.72)], args)
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["objective"], r["seed"], r["top1"]) for r in records] == [
        ("mapet", 0, 0.72), ("mapet", 1, 0.74), ("none", 0, 0.60)]                   # seed 0 replaced, scratch kept
    assert "Seeds 0, 1;" in (tmp_path / "results.md").read_text()
    assert "![every seed and the paired differences](results.png)" in (tmp_path / "results.md").read_text()
    with Image.open(tmp_path / "results.png") as picture:
        picture.load()                                      # decodes whole, not only the header
        assert picture.format == "PNG" and picture.size == (1200, 460)

    report = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink(), (tmp_path / "results.png").unlink()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--redraw", "--out", str(tmp_path)],
                   check=True, capture_output=True)
    assert (tmp_path / "results.md").read_text() == report and (tmp_path / "results.png").stat().st_size > 10_000


def test_merge_refuses_the_runs_of_other_code_before_running_any(tmp_path):
    from mapet.files import write_json

    out = tmp_path / "cmp"
    write_json(out / "results.json", [{"objective": "mapet", "init": "pretrained", "seed": 0, "code": "0123abcd",
                                       "top1": 0.7}])
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--merge", "--out", str(out),
                             "--seeds", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert str(out / "results.json") in result.stderr and "0123abcd" in result.stderr
    assert code_revision() in result.stderr and "+ dvc" not in result.stdout           # refused before any run
