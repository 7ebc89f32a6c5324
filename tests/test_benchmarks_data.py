"""benchmarks/imagenet_like.py makes shards and tokens that the reader and `mapet pretrain` accept."""

import json

import torch

from benchmarks.imagenet_like import make_imagenet_like
from mapet.data.dataset import read_manifest
from mapet.data.reader import ShardDataset
from mapet.data.transforms import pretrain_transform
from mapet.tokenizers.tokens import load_tokens


def test_imagenet_like_dataset_and_tokens(tmp_path):
    data, tokens_dir = make_imagenet_like(tmp_path / "bench", images=24, classes=3, test=4, shard_size=8, workers=2)

    manifest = read_manifest(data)
    train = manifest[manifest["split"] == "train"]
    assert len(train) == 24 and train["shard"].nunique() == 3 and sorted(manifest["label"].unique()) == [0, 1, 2]
    assert (manifest["mode"] == "RGB").all() and (manifest[["width", "height"]].min(axis=1) >= 200).all()
    assert manifest["bytes"].mean() > 60_000                   # photo-like JPEGs, not flat colour
    assert json.loads((data / "dataset.json").read_text())["bad_files"] == []

    tokens, description = load_tokens(tokens_dir, data, expected_grid=(14, 14))
    assert tokens.shape == (28, 196) and int(tokens.max()) < 8192 and description["k"] == 8192
    assert description["encoder"]["name"].startswith("random")

    images = [image for image, _, _ in ShardDataset(data, "train", pretrain_transform(224, 0.4))]
    assert len(images) == 24 and all(image.shape == torch.Size([3, 224, 224]) for image in images)
