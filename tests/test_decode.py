"""Decoding on the device (pretrain.decode: gpu): nvJPEG on a GPU, libjpeg here, the same tensors
and the same training run as the loader workers' PIL path."""

import json

import pytest
import torch
from test_pretrain import finish, history, launch, tokens, write_params  # noqa: F401 (fixture)
from torchvision.transforms.v2 import functional as TF

from benchmarks.imagenet_like import make_imagenet_like
from mapet.data.reader import ShardDataset, collate_encoded
from mapet.data.transforms import decode_center_square, pretrain_transform


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_imagenet_like(tmp_path_factory.mktemp("jpegs"), images=16, classes=2, shard_size=8, k=64, workers=1)


def test_device_decode_gives_the_workers_images(jpegs):
    data, _ = jpegs
    expected = torch.stack([image for image, _, _ in ShardDataset(data, "train", pretrain_transform(224, normalize=False))])
    files, _, keys = collate_encoded(list(ShardDataset(data, "train", decode=False)))
    assert len({tuple(image.shape) for image in files}) > 1          # files of different lengths stay a list
    decoded = decode_center_square(files, 224, torch.device("cpu"))
    assert decoded.dtype == torch.uint8 and decoded.shape == expected.shape
    difference = (decoded.int() - expected.int()).abs()
    # PIL's resampling filter also reads the pixels just outside the square; inside, the two agree
    assert difference.float().mean() < 0.5 and difference[:, :, 8:-8, 8:-8].max() <= 8


def test_device_color_jitter_blends_as_torchvision(jpegs):
    data, _ = jpegs
    files, _, _ = collate_encoded(list(ShardDataset(data, "train", decode=False)))
    plain = decode_center_square(files, 64, torch.device("cpu"))
    jittered = decode_center_square(files, 64, torch.device("cpu"), 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(jittered, decode_center_square(files, 64, torch.device("cpu"), 0.4,
                                                      torch.Generator().manual_seed(3)))
    generator = torch.Generator().manual_seed(3)
    factors = 1 + 0.4 * (2 * torch.rand(3, len(files), generator=generator) - 1)
    order = torch.randperm(3, generator=generator).tolist()                  # one order for the batch
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for index, image in enumerate(plain.float() / 255):
        for step in order:
            image = adjust[step](image, factors[step, index].item())
        # the test starts from rounded pixels, the decoder from unrounded ones (factors up to 1.4 twice)
        difference = (jittered[index].float() - image * 255).abs()
        assert difference.mean() < 0.5 and difference.max() <= 1.5


def test_pretrain_decoding_on_the_device_trains_as_the_workers(jpegs, tmp_path):
    data, token_dir = jpegs
    runs = {}
    for decode in ("cpu", "gpu"):
        folder = tmp_path / decode
        folder.mkdir()
        params = write_params(folder, data, token_dir, decode=decode, epochs=2, checkpoint_every=100)
        document = json.loads(params.read_text())
        document["model"].update(img_size=224, patch_size=16, depth=1)
        params.write_text(json.dumps(document))
        finish(launch(params))
        runs[decode] = history(folder)
    assert len(runs["gpu"]) == len(runs["cpu"]) == 2
    for cpu, gpu in zip(runs["cpu"], runs["gpu"]):
        assert gpu["loss"] == pytest.approx(cpu["loss"], abs=2e-3)


def test_device_decoding_refuses_png_naming_the_image(tokens, tmp_path):
    data, token_dir = tokens
    process = launch(write_params(tmp_path, data, token_dir, decode="gpu"))
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "is not a JPEG" in output and "train_00000" in output and "pretrain.decode: cpu" in output
