"""Pre-training on real DeepSpeed (gloo on the CPU), in subprocesses as a user would run it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mapet.cli import main

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
TINY_VIT = {"backbone": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 4, "depth": 2, "embed_dim": 32,
            "num_heads": 2, "init_values": 0.1, "drop_path_rate": 0.1}

pytestmark = pytest.mark.slow


def write_params(folder: Path, data: Path, tokens: Path, **pretrain) -> Path:
    params = {
        "data": {"dir": str(data), "format": "fashion-mnist", "source": FASHION_MNIST,
                 "max_per_split": {"train": 64, "test": 16}, "shard_size": 8, "workers": 1},
        "model": TINY_VIT,
        "tokenizer": {"encoder": {"kind": "efficientnet-lite0", "input_size": 112}, "split": "train",
                      "sample_images": 32, "max_vectors": 800, "k": 16, "iterations": 5, "restarts": 1,
                      "seed": 0, "batch_size": 16, "workers": 0, "out_dir": str(folder / "tokenizer")},
        "tokenize": {"batch_size": 16, "workers": 0, "out_dir": str(tokens)},
        "pretrain": {"objective": "mapet", "epochs": 2, "batch_size": 16, "micro_batch_size": 8, "lr": 1e-3,
                     "warmup_epochs": 0.5, "zero_stage": 1, "seed": 7, "workers": 2, "checkpoint_every": 2,
                     "out_dir": str(folder / "out"), **pretrain},
    }
    path = folder / "params.yaml"
    path.write_text(json.dumps(params))
    return path


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrain-data")
    params = write_params(folder, folder / "data", folder / "tokens")
    for command in (["data", "import"], ["tokenizer", "build"], ["tokenize"]):
        assert main([*command, "--params", str(params)]) == 0
    return folder / "data", folder / "tokens"


def launch(params: Path, processes: int = 1, resume: bool = False) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "mapet.cli", "pretrain", "--params", str(params)] + (["--resume"] if resume else [])
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "mapet.cli", "pretrain", "--params", str(params)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def history(folder: Path) -> list[dict]:
    return json.loads((folder / "out" / "history.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "out" / "model.safetensors"))


def test_two_processes_match_one_process_with_the_same_global_batch(tokens, tmp_path):
    data, token_dir = tokens
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    # one process: 2 DataLoader workers, 2 micro-batches of 8 per step; two processes: 1 worker, 1 micro-batch each
    output = finish(launch(write_params(one, data, token_dir, workers=2)))
    assert "1 rank(s) x 2 reader(s)" in output and "tokens from EfficientNet-Lite0 (k = 16, not CLIP)" in output
    output = finish(launch(write_params(two, data, token_dir, workers=1), processes=2))
    assert "2 rank(s) x 1 reader(s)" in output
    steps_one, steps_two = history(one), history(two)
    assert len(steps_one) == len(steps_two) == 8  # 64 images, global batch 16, 2 epochs
    for a, b in zip(steps_one, steps_two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4) and a["lr"] == pytest.approx(b["lr"])
    assert steps_one[-1]["loss"] < steps_one[0]["loss"]
    for name, tensor in weights(one).items():
        torch.testing.assert_close(tensor, weights(two)[name], rtol=1e-4, atol=1e-5)
    metrics = json.loads((one / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and 0 <= metrics["token_accuracy"] <= 1


@pytest.mark.parametrize("zero_stage", [1, 0])      # DeepSpeed's ZeRO optimizer; torch's AdamW, fused
def test_killed_run_resumes_to_the_same_weights(tokens, tmp_path, zero_stage):
    data, token_dir = tokens
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    settings = {"epochs": 6, "workers": 1, "checkpoint_every": 3, "zero_stage": zero_stage}  # 24 steps, checkpoints every 3
    finish(launch(write_params(whole, data, token_dir, **settings)))

    params = write_params(killed, data, token_dir, **settings)
    process = launch(params)
    latest = killed / "out" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text() >= "step00000006") and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "out" / "model.safetensors").exists()

    output = finish(launch(params, resume=True))
    assert "resuming at step" in output
    assert history(killed) == history(whole)
    for name, tensor in weights(whole).items():
        torch.testing.assert_close(weights(killed)[name], tensor, rtol=0, atol=1e-6)


def test_token_file_for_other_data_is_refused_before_training(tokens, tmp_path, capsys):
    _, token_dir = tokens
    other = tmp_path / "other"
    params = write_params(tmp_path, other, token_dir)
    config = json.loads(params.read_text())
    config["data"]["max_per_split"] = {"train": 40, "test": 8}
    params.write_text(json.dumps(config))
    assert main(["data", "import", "--params", str(params)]) == 0
    started = time.monotonic()
    assert main(["pretrain", "--params", str(params)]) == 2
    assert "made for another manifest" in capsys.readouterr().err
    assert time.monotonic() - started < 5 and not (tmp_path / "out").exists()


def test_finetune_loads_every_backbone_weight(tmp_path):
    from mapet.engine.steps import loop_settings
    from mapet.engine.finetune import FinetuneSettings, build_classifier
    from mapet.models import create_pretrain_model, save_backbone

    pretrained = create_pretrain_model("mapet", "vit_tiny_patch16_224", 16,
                                       **{k: v for k, v in TINY_VIT.items() if k != "backbone"})
    save_backbone(pretrained, tmp_path / "backbone.safetensors")
    settings = loop_settings("finetune", {"drop_path_rate": 0.1}, TINY_VIT, FinetuneSettings, ("drop_path_rate",))
    model, _, loaded = build_classifier(settings, 10, tmp_path / "backbone.safetensors")
    source = pretrained.backbone.state_dict()
    fresh = {name for name, _ in model.named_parameters()} - set(loaded)
    assert fresh == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    for name in loaded:
        assert torch.equal(model.state_dict()[name], source[name]), name

    from safetensors.torch import save_file
    tensors = load_file(str(tmp_path / "backbone.safetensors"))
    del tensors["blocks.1.mlp.fc2.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata={"kind": "backbone"})
    with pytest.raises(Exception, match=r"missing \['blocks.1.mlp.fc2.weight'\]"):
        build_classifier(settings, 10, tmp_path / "broken.safetensors")


def test_classification_metrics_on_fixed_logits():
    from mapet.engine.evaluate import classification_metrics

    classes = ["a", "b", "c", "d", "e", "f"]
    labels = torch.tensor([0, 0, 1, 2, 5, 5])
    logits = torch.full((6, 6), -10.0)
    ranking = [[0, 1, 2, 3, 4, 5], [1, 0, 2, 3, 4, 5], [1, 2, 0, 3, 4, 5],
               [2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    for row, order in enumerate(ranking):
        for place, label in enumerate(order):
            logits[row, label] = 10.0 - place
    metrics, confusion = classification_metrics(logits, labels, classes)
    assert metrics["top1"] == round(4 / 6, 5)  # rows 0, 2, 3, 5 (metrics are rounded to 5 places)
    assert metrics["top5"] == round(5 / 6, 5)  # row 4: label 5 ranks sixth
    assert metrics["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 1.0, "f": 0.5}  # d, e: no images
    assert confusion[0].tolist() == [1, 1, 0, 0, 0, 0] and confusion[5].tolist() == [1, 0, 0, 0, 0, 1]
    assert confusion.sum() == 6


@pytest.mark.parametrize("zero_stage, bf16", [(1, False), (0, True)])     # the demo's and the paper preset's
def test_finetune_then_evaluate_end_to_end(tokens, tmp_path, zero_stage, bf16):
    data, token_dir = tokens
    params = write_params(tmp_path, data, token_dir)
    config = json.loads(params.read_text())
    config["finetune"] = {"epochs": 1, "batch_size": 16, "micro_batch_size": 8, "lr": 1e-3, "workers": 1,
                          "checkpoint_every": 2, "zero_stage": zero_stage, "bf16": bf16, "out_dir": str(tmp_path / "ft")}
    config["evaluate"] = {"split": "test", "crop_pct": 0.875, "batch_size": 8, "workers": 0,
                          "out_dir": str(tmp_path / "ev")}
    params.write_text(json.dumps(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "mapet.cli", "finetune", "--scratch", "--params", str(params)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "backbone scratch (random init)" in result.stdout
    assert main(["evaluate", "--params", str(params)]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()[1:]
    assert metrics["images"] == len(rows) == 16
    assert metrics["top1"] == round(sum(r.split(",")[1] == r.split(",")[2] for r in rows) / 16, 5)
    assert (tmp_path / "ev" / "confusion_matrix.png").stat().st_size > 1000


def test_a_non_finite_loss_stops_the_run_with_a_message(tokens, tmp_path):
    data, token_dir = tokens
    params = write_params(tmp_path, data, token_dir, lr=1e30, warmup_lr=1e30, warmup_epochs=0, workers=1)
    process = launch(params)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "pretrain mapet: the loss is nan at step" in output and "--resume" in output
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("damage", ["missing part", "cut short"])
def test_resume_skips_a_damaged_newest_checkpoint_for_the_one_before(tokens, tmp_path, damage):
    data, token_dir = tokens
    settings = {"epochs": 3, "workers": 1, "checkpoint_every": 3}      # 12 steps: checkpoints at 9 and 12 kept
    params = write_params(tmp_path, data, token_dir, **settings)
    finish(launch(params))
    whole = history(tmp_path)
    newest = tmp_path / "out" / "checkpoints" / "step00000012"
    states = sorted(newest.glob("*optim_states.pt"))
    assert states, sorted(p.name for p in newest.iterdir())
    if damage == "missing part":
        states[0].unlink()
    else:
        states[0].write_bytes(states[0].read_bytes()[:100])

    output = finish(launch(params, resume=True))
    assert "cannot resume from it" in output and "resuming from" in output and "step00000009" in output
    assert history(tmp_path) == whole


def test_resume_with_no_loadable_checkpoint_is_one_message(tokens, tmp_path):
    data, token_dir = tokens
    params = write_params(tmp_path, data, token_dir, epochs=1, workers=1, checkpoint_every=2)
    finish(launch(params))
    for states in (tmp_path / "out" / "checkpoints").glob("step*/*model_states.pt"):
        states.write_bytes(b"")
    process = launch(params, resume=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2
    assert "no checkpoint could be loaded (tried step00000004, step00000002)" in output
    assert "mapet pretrain: error:" in output and "Traceback" not in output
