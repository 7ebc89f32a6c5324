"""A tiny project repository for the end-to-end tests: git + DVC-pinned Fashion-MNIST subset
(64 training and 20 test images) + parameters that train for seconds."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
TINY_PARAMS = {
    "preset": None,
    "data": {"dir": "data", "format": "fashion-mnist", "source": FASHION_MNIST,
             "max_per_split": {"train": 64, "test": 20}, "shard_size": 8, "workers": 1},
    "validate": {"report_dir": "reports/validation", "min_size": 28, "max_size": 4096, "modes": ["L", "RGB"],
                 "min_images_per_class": 1, "min_class_share": 0.0, "workers": 1},
    "model": {"backbone": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 4, "depth": 2, "embed_dim": 32,
              "num_heads": 2, "init_values": 0.1, "drop_path_rate": 0.1},
    "tokenizer": {"encoder": {"kind": "efficientnet-lite0", "model": None, "pretrained": None, "input_size": 112},
                  "split": "train", "sample_images": 32, "max_vectors": 800, "k": 16, "iterations": 5, "restarts": 1,
                  "seed": 0, "batch_size": 16, "workers": 0, "out_dir": "outputs/tokenizer"},
    "tokenize": {"batch_size": 16, "workers": 0, "out_dir": "outputs/tokens"},
    "pretrain": {"objective": "mapet", "epochs": 1, "batch_size": 16, "micro_batch_size": 16, "lr": 1e-3,
                 "warmup_epochs": 0.5, "seed": 7, "workers": 1, "checkpoint_every": 2, "probe_every": 0.5,
                 "probe_train_images": 32, "probe_test_images": 20, "out_dir": "outputs/pretrain"},
    "probe": {"train_split": "train", "test_split": "test", "train_images": 0, "test_images": 0, "k": 5,
              "temperature": 0.07, "linear_iterations": 50, "linear_weight_decay": 1e-4, "batch_size": 32,
              "workers": 0, "seed": 0, "out_dir": "outputs/probe"},
    "pictures": {"split": "test", "images": 3, "seed": 0, "codes": 4, "patches_per_code": 4, "codebook_images": 20,
                 "context": 1, "out_dir": "outputs/pictures"},
    "finetune": {"init": "pretrained", "seed": 0, "epochs": 1, "batch_size": 16, "micro_batch_size": 16, "lr": 1e-3,
                 "workers": 1, "max_shards": 4, "checkpoint_every": 2, "out_dir": "outputs/finetune"},
    "evaluate": {"split": "test", "crop_pct": 0.875, "batch_size": 8, "workers": 0, "out_dir": "outputs/evaluate"},
    "presets": {"paper": {"pretrain": {"epochs": 300}}},
    "pipeline": {"promotion": {"stage": "prod", "min_delta": 0.005}},
}
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def sh(*argv, cwd) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **GIT_IDENTITY, "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, f"{argv}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout.strip()


def make_pinned_repo(repo: Path, with_stages: bool = False) -> Path:
    """A git repository whose data.dvc pins the tiny import; its DVC cache can serve as the remote.
    ``with_stages`` adds the project's dvc.yaml and the code its stages list as dependencies."""
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    if with_stages:
        shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
        shutil.copytree(ROOT / "src" / "mapet", repo / "src" / "mapet", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    sh("git", "init", "--quiet", "--initial-branch=main", cwd=repo)
    sh(sys.executable, "-m", "mapet", "data", "import", cwd=repo)
    sh("dvc", "init", "--quiet", cwd=repo)
    sh("dvc", "add", "--quiet", "data", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "--quiet", "-m", "pin the data", cwd=repo)
    return repo
