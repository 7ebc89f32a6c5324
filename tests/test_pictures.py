"""`mapet pictures`: the files are written, the right/wrong counts are the model's, bad input is one message."""

import json
import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from mapet.cli import main
from mapet.data.dataset import read_manifest
from mapet.data.reader import ShardDataset
from mapet.data.transforms import pretrain_transform
from mapet.engine.pictures import PicturesSettings, run_pictures
from mapet.masking import default_num_predict, sample_orders
from mapet.models import create_pretrain_model, load_pretrain_model, save_pretrain_model
from mapet.files import file_sha256
from mapet.tokenizers.tokens import load_tokens
from test_pretrain import TINY_VIT, write_params


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """80 Fashion-MNIST images and a stand-in token file: each patch's mean brightness in 16 levels."""
    folder = tmp_path_factory.mktemp("pictures-data")
    data, token_dir = folder / "data", folder / "tokens"
    assert main(["data", "import", "--params", str(write_params(folder, data, token_dir))]) == 0
    manifest = read_manifest(data)
    ids = np.zeros((len(manifest), 49), dtype=np.uint16)
    row_of = {key: row for row, key in enumerate(manifest["key"])}
    for split in manifest["split"].unique():
        for image, _, key in ShardDataset(data, split, pretrain_transform(28, normalize=False)):
            means = image.float().mean(0).reshape(7, 4, 7, 4).mean(dim=(1, 3))
            ids[row_of[key]] = (means * 16 / 256).long().clamp(max=15).flatten().numpy()
    token_dir.mkdir()
    np.save(token_dir / "tokens.npy", ids)
    (token_dir / "tokens.json").write_text(json.dumps({
        "encoder": {"name": "brightness", "clip": False}, "k": 16, "grid": [7, 7], "rows": len(manifest),
        "manifest_sha256": file_sha256(data / "manifest.parquet"), "codebook_sha256": "c" * 64}))
    return data, token_dir


def tiny_model(path, token_dir, data, provenance=None):
    """A one-block model whose head leans towards the most used code, so that some predictions are right."""
    torch.manual_seed(0)
    vit = {key: value for key, value in TINY_VIT.items() if key != "backbone"} | {"depth": 1}
    model = create_pretrain_model("mapet", TINY_VIT["backbone"], 16, **vit)
    ids, _ = load_tokens(token_dir, data)
    with torch.no_grad():
        model.token_head.bias[int(torch.from_numpy(ids.astype("int64")).flatten().bincount().argmax())] = 0.5
    save_pretrain_model(model, path, provenance)
    return path


def test_right_counts_are_those_of_the_model_logits(tokens, tmp_path):
    data, token_dir = tokens
    model_file = tiny_model(tmp_path / "model.safetensors", token_dir, data)
    settings = PicturesSettings(images=4, seed=3, codes=5, patches_per_code=3)
    shown = run_pictures(model_file, data, token_dir, tmp_path / "out", settings)
    for name in ("predictions.png", "codebook.png", "index.html"):
        assert (tmp_path / "out" / name).stat().st_size > 5000, name
    assert (tmp_path / "out" / "index.html").read_text().count("data:image/png;base64,") == 2

    model = load_pretrain_model(model_file).eval()
    items = list(islice(ShardDataset(data, "test", pretrain_transform(28)), 4))
    num_predict = default_num_predict("mapet", 49)
    order = sample_orders("mapet", 4, (7, 7), num_predict, torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(torch.stack([image for image, _, _ in items]), order, num_predict)
    ids, _ = load_tokens(token_dir, data)
    row_of = {key: row for row, key in enumerate(read_manifest(data)["key"])}
    expected = []
    for b, (_, _, key) in enumerate(items):
        expected.append(sum(int(logits[b, t].argmax()) == int(ids[row_of[key], int(order[b, 49 - num_predict + t])])
                            for t in range(num_predict)))
    assert [image["key"] for image in shown["images"]] == [key for _, _, key in items]
    assert [image["right"] for image in shown["images"]] == expected
    assert 0 < sum(expected) < 4 * num_predict                               # neither all wrong nor all right
    assert len(shown["codes"]) == 5 and shown["codes"][0]["share"] >= shown["codes"][-1]["share"]


def test_command_writes_the_pictures_and_bad_input_is_one_line_with_exit_2(tokens, tmp_path, capsys):
    data, token_dir = tokens
    params = write_params(tmp_path, data, token_dir)
    model_file = tiny_model(tmp_path / "model.safetensors", token_dir, data)
    command = ["pictures", "--params", str(params), "--model", str(model_file), "--images", "2",
               "--out", str(tmp_path / "pictures")]
    assert main(command) == 0
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["codebook.png", "index.html",
                                                                         "predictions.png"]

    other = tmp_path / "other-tokens"
    shutil.copytree(token_dir, other)
    description = json.loads((other / "tokens.json").read_text())
    (other / "tokens.json").write_text(json.dumps({**description, "manifest_sha256": "0" * 64}))
    trained_elsewhere = tiny_model(tmp_path / "elsewhere.safetensors", token_dir, data,
                                   {"tokens": {"codebook_sha256": "f" * 64}})
    capsys.readouterr()
    for bad, message in ((["--model", str(tmp_path / "missing.safetensors")], "no such file"),
                         (["--tokens", str(other)], "made for another manifest"),
                         (["--model", str(trained_elsewhere)], "tokens of another codebook")):
        assert main([*command, *bad]) == 2
        error = capsys.readouterr().err
        assert error.startswith("mapet pictures: error: ") and message in error and error.count("\n") == 1, error
