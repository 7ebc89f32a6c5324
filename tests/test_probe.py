"""`mapet probe` and the k-NN monitor: the read-outs score what the features encode."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from mapet.cli import main
from mapet.data.dataset import read_manifest
from mapet.data.reader import ShardDataset
from mapet.data.transforms import pretrain_transform
from mapet.engine.finetune import init_head_by_probe
from mapet.engine.probe import (ProbeSettings, extract_features, extract_pixels, fit_linear, flat_pixels, knn_top1,
                                linear_top1, pixel_baseline)
from test_pretrain import history, launch, finish, tokens, write_params  # noqa: F401 (fixture)

CLASSES = 5


def labelled_features(n: int, informative: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=generator)
    features = torch.randn(n, 16, generator=generator)
    if informative:
        features[:, :CLASSES] += 4 * F.one_hot(labels, CLASSES)
    return features, labels


@pytest.mark.parametrize("readout", [knn_top1, linear_top1])
def test_features_that_encode_the_label_score_near_one_random_ones_near_chance(readout):
    assert readout(*labelled_features(400, True, 0), *labelled_features(200, True, 1)) > 0.95
    chance = readout(*labelled_features(400, False, 0), *labelled_features(1000, False, 1))
    assert abs(chance - 1 / CLASSES) < 0.06


def test_knn_equals_a_brute_force_weighted_vote():
    train, train_labels = labelled_features(60, True, 2)
    test, test_labels = labelled_features(25, True, 3)
    train, test = train + torch.randn_like(train) * 3, test + torch.randn_like(test) * 3   # not all correct
    k, temperature = 7, 0.07
    correct = 0
    for x, label in zip(test, test_labels):
        similarity = torch.tensor([float(F.cosine_similarity(x, y, dim=0)) for y in train])
        votes = [0.0] * CLASSES
        for i in similarity.argsort(descending=True)[:k]:
            votes[int(train_labels[i])] += float(torch.exp(similarity[i] / temperature))
        correct += int(max(range(CLASSES), key=votes.__getitem__) == int(label))
    expected = correct / len(test)
    assert 0 < expected < 1
    assert knn_top1(train, train_labels, test, test_labels, k, temperature, chunk=4) == pytest.approx(expected)


def test_probe_command_on_a_backbone_and_on_scratch(tokens, tmp_path, capsys):
    data, _ = tokens
    params = write_params(tmp_path, data, tmp_path / "unused")
    document = json.loads(params.read_text())
    document["probe"] = {"k": 5, "linear_iterations": 50, "out_dir": str(tmp_path / "probe")}
    params.write_text(json.dumps(document))
    assert main(["probe", "--params", str(params), "--scratch"]) == 0
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["backbone"] == "scratch" and metrics["train_images"] == 64 and metrics["test_images"] == 16
    assert metrics["knn_top1"] == metrics["avg"]["knn_top1"] and metrics["linear_top1"] == metrics["cls_avg"]["linear_top1"]
    for key in ("knn_top1", "linear_top1"):
        assert 0 <= metrics[key] <= 1 and 0 < metrics[f"pixels_{key}"] <= 1
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 1000

    assert main(["probe", "--params", str(params), "--backbone", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err


def test_monitor_does_not_change_the_training_run(tokens, tmp_path):
    data, token_dir = tokens
    runs = {}
    for name, every in (("plain", 0), ("monitored", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        finish(launch(write_params(folder, data, token_dir, probe_every=every, probe_train_images=32,
                                   probe_test_images=16)))
        runs[name] = history(folder)
    probed = [record for record in runs["monitored"] if record["knn_top1"] is not None]
    assert [record["step"] for record in probed] == [2, 4, 6, 8]             # every half epoch of 4 steps
    assert all(0 <= record["knn_top1"] <= 1 for record in probed)
    assert all(record["knn_top1"] is None for record in runs["plain"])
    without_probe = [[{k: v for k, v in record.items() if k != "knn_top1"} for record in run] for run in runs.values()]
    assert without_probe[0] == without_probe[1]
    assert json.loads((tmp_path / "monitored" / "out" / "metrics.json").read_text())["knn_top1"] == probed[-1]["knn_top1"]


def test_probe_initialised_head_is_the_linear_probe_of_the_features_it_sees(tokens):
    data, _ = tokens
    shards = sorted(read_manifest(data).query("split == 'train'")["shard"].unique())[:4]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, depth=1, embed_dim=32, num_heads=2,
                              num_classes=10, global_pool="avg").eval()
    init_head_by_probe(model, data, "train", shards, 10, progress=False)
    features, labels = extract_features(model, data, "train", 0, shards=shards, progress=False)
    assert len(labels) == 32                                                   # 4 shards of 8
    torch.testing.assert_close(model.head.weight, fit_linear(features["pre_logits"], labels, 10).weight.float())
    images = torch.stack([image for image, _, _ in ShardDataset(data, "train", pretrain_transform(28), shards=shards)])
    accuracy = (model(images).argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.5                                  # fitted: far above chance (0.1) on what it was fitted to


def test_pixel_baseline_reads_out_one_grey_channel_standardised(tokens):
    data, _ = tokens
    settings = ProbeSettings(k=5, linear_iterations=50)
    images, labels = extract_pixels(data, "train", 0, 28)
    test_images, test_labels = extract_pixels(data, "test", 0, 28)
    assert images.shape == (64, 3, 28, 28) and images.dtype == torch.uint8 and len(test_labels) == 16
    assert torch.equal(images[:, 1], images[:, 0]) and images.float().std() > 0   # Fashion-MNIST: grey as RGB
    train, test = images[:, 0].flatten(1).float(), test_images[:, 0].flatten(1).float()
    mean, std = train.mean(dim=0), train.std(dim=0).clamp(min=1e-6)
    expected = {"pixels_knn_top1": knn_top1((train - mean) / std, labels, (test - mean) / std, test_labels, 5, 0.07, 10),
                "pixels_linear_top1": linear_top1(train, labels, test, test_labels, 50, 1e-4, 10)}
    assert pixel_baseline(data, settings, 28, 10) == pytest.approx(expected, abs=1e-5)
    assert 0 < expected["pixels_linear_top1"] <= 1


def test_flat_pixels_keeps_one_channel_only_when_every_image_is_grey():
    grey = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8).expand(4, 3, 2, 2)
    assert [x.shape for x in flat_pixels(grey, grey[:2])] == [(4, 4), (2, 4)]
    colour = grey.clone()
    colour[1, 2, 0, 0] ^= 1
    assert [x.shape for x in flat_pixels(grey, colour)] == [(4, 12), (4, 12)]
    torch.testing.assert_close(flat_pixels(colour)[0], colour.flatten(1).float())
