import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

from mapet.cli import main
from mapet.data.dataset import read_manifest
from mapet.data.reader import ShardDataset
from mapet.errors import MapetError
from mapet.tokenizers.codebook import KMeansSettings, load_codebook, nearest, train_kmeans
from mapet.tokenizers.encoders import EfficientNetLite0Encoder, OpenClipEncoder, TimmEncoder, create_encoder
from mapet.tokenizers.health import codebook_health
from mapet.tokenizers.tokens import load_tokens, tokenize_dataset

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def write_params(folder: Path, train=60, test=20, **tokenizer) -> Path:
    params = {
        "data": {"dir": str(folder / "data"), "format": "fashion-mnist", "source": FASHION_MNIST,
                 "max_per_split": {"train": train, "test": test}, "shard_size": 10, "workers": 1},
        "model": {"img_size": 28, "patch_size": 4},
        "tokenizer": {"encoder": {"kind": "efficientnet-lite0", "input_size": 112}, "split": "train",
                      "sample_images": 40, "max_vectors": 1000, "k": 16, "iterations": 10, "restarts": 1,
                      "max_points_per_centroid": 512, "seed": 0, "batch_size": 8, "workers": 0,
                      "out_dir": str(folder / "tokenizer"), **tokenizer},
        "tokenize": {"batch_size": 8, "workers": 0, "out_dir": str(folder / "tokens")},
    }
    path = folder / "params.yaml"
    path.write_text(json.dumps(params))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    params = write_params(folder)
    assert main(["data", "import", "--params", str(params)]) == 0
    assert main(["tokenizer", "build", "--params", str(params)]) == 0
    assert main(["tokenize", "--params", str(params)]) == 0
    return folder, params


def test_kmeans_recovers_synthetic_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (8, 16))
    labels = np.repeat(np.arange(8), 300)
    vectors = (centres[labels] + rng.normal(0, 0.5, (len(labels), 16))).astype(np.float32)
    # faiss seeds k-means at random points: restarts (the best run is kept) find the global optimum
    _, single = train_kmeans(vectors, KMeansSettings(k=8, iterations=20, restarts=1, seed=0))
    centroids, result = train_kmeans(vectors, KMeansSettings(k=8, iterations=20, restarts=10, seed=0))
    assert result["objective"] < single["objective"]
    assigned = nearest(centroids, vectors)
    for cluster in range(8):
        assert len(set(assigned[labels == cluster])) == 1  # each true cluster lands on one centroid
    assert len(set(assigned)) == 8 and result["device"] == "cpu"
    assert np.abs(np.sort(centroids, axis=0) - np.sort(centres, axis=0)).max() < 0.2


def test_kmeans_refuses_too_few_vectors():
    with pytest.raises(MapetError, match="only 10 patch vectors for k = 16"):
        train_kmeans(np.zeros((10, 4), np.float32), KMeansSettings(k=16))


@pytest.mark.parametrize("model,dim", [("RN50", 2048), ("ViT-B-32", 768)])
def test_open_clip_random_weights_give_an_aligned_grid(model, dim):
    encoder = OpenClipEncoder(model, None, 224)
    assert encoder.grid_and_dim() == ((7, 7), dim)
    encoder.check_grid((7, 7))
    with pytest.raises(MapetError, match=r"gives a 7x7 feature grid, but the ViT has 14x14 patches"):
        encoder.check_grid((14, 14))
    assert encoder.describe()["clip"] is False and "random" in encoder.describe()["note"]


def test_open_clip_local_weights_file_loads(tmp_path):
    torch.manual_seed(3)
    reference = open_clip.create_model("RN50", pretrained=None)
    torch.save(reference.state_dict(), tmp_path / "rn50.pt")
    encoder = OpenClipEncoder("RN50", str(tmp_path / "rn50.pt"), 224)
    assert torch.equal(encoder.visual.layer4[0].conv1.weight, reference.visual.layer4[0].conv1.weight)
    assert encoder.describe()["clip"] is True and encoder.describe()["weights"] == str(tmp_path / "rn50.pt")


def test_missing_clip_weights_say_where_to_put_them():
    with pytest.raises(MapetError) as error:
        create_encoder({"kind": "open_clip", "model": "RN50", "pretrained": "openai"})
    message = str(error.value)
    assert "tokenizer.encoder.pretrained" in message and "HF_HOME" in message and "Traceback" not in message


def test_timm_local_weights_file_loads(tmp_path):
    reference = timm.create_model("resnet18", num_classes=0)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    encoder = TimmEncoder("resnet18", str(tmp_path / "r18.pth"), 224)
    assert torch.equal(encoder.network.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert encoder.grid_and_dim() == ((7, 7), 512)


def test_packaged_encoder_is_labelled_not_clip():
    encoder = EfficientNetLite0Encoder(112)
    assert encoder.grid_and_dim() == ((7, 7), 80)
    description = encoder.describe()
    assert description["clip"] is False and description["note"].startswith("not CLIP")


def test_tokens_align_with_the_manifest_and_stay_below_k(built):
    folder, _ = built
    tokens, description = load_tokens(folder / "tokens", folder / "data", expected_grid=(7, 7))
    manifest = read_manifest(folder / "data")
    assert tokens.shape == (80, 49) and tokens.dtype == np.uint16 and tokens.max() < 16
    assert description["encoder"]["clip"] is False and description["k"] == 16
    codebook = load_codebook(folder / "tokenizer" / "codebook.safetensors")
    encoder = EfficientNetLite0Encoder(112)
    by_key = {key: image for image, _, key in ShardDataset(folder / "data", "test", encoder.transform())}
    for row in (62, 79):  # two test images, looked up by key
        key = manifest["key"][row]
        with torch.no_grad():
            features = encoder(by_key[key][None]).reshape(-1, 80).numpy()
        assert np.array_equal(tokens[row], nearest(codebook.centroids, features))


def test_health_reports_and_plots(built):
    folder, _ = built
    health = json.loads((folder / "tokens" / "health.json").read_text())
    assert health["codes"] == 16 and health["patches"] == 60 * 49
    assert health["codes_used"] + health["dead_codes"] == 16
    assert Image.open(folder / "tokens" / "cluster_sizes.png").size[0] > 500
    assert "perplexity" in (folder / "tokens" / "codebook.md").read_text()


def test_codebook_health_numbers():
    tokens = np.array([[0, 1, 2, 3], [0, 1, 2, 3]], dtype=np.uint16)
    metrics, counts = codebook_health(tokens, k=8)
    assert metrics["fraction_used"] == 0.5 and metrics["dead_codes"] == 4
    assert metrics["perplexity"] == pytest.approx(4.0) and counts.tolist() == [2, 2, 2, 2, 0, 0, 0, 0]


class Interrupt(Exception):
    pass


class FailingEncoder(EfficientNetLite0Encoder):
    """Stops the run after a few batches, as a killed process would."""

    def __init__(self, batches):
        super().__init__(112)
        self.left = batches

    def forward(self, images):
        if self.left == 0:
            raise Interrupt
        self.left -= 1
        return super().forward(images)


def test_interrupted_tokenize_resumes_to_the_same_result(built, tmp_path):
    folder, _ = built
    codebook_path = folder / "tokenizer" / "codebook.safetensors"
    codebook = load_codebook(codebook_path)
    with pytest.raises(Interrupt):
        tokenize_dataset(FailingEncoder(batches=5), codebook, codebook_path, folder / "data", tmp_path,
                         batch_size=4, progress=False)
    progress = json.loads((tmp_path / "tokens.progress.json").read_text())
    assert 0 < len(progress["done_shards"]) < 8 and not (tmp_path / "tokens.npy").exists()
    resumed = FailingEncoder(batches=100)
    tokenize_dataset(resumed, codebook, codebook_path, folder / "data", tmp_path, batch_size=4, progress=False)
    assert resumed.left > 100 - 20  # the finished shards were not encoded again
    assert np.array_equal(np.load(tmp_path / "tokens.npy"), np.load(folder / "tokens" / "tokens.npy"))
    assert not (tmp_path / "tokens.progress.json").exists()


def test_token_file_from_another_manifest_is_refused(built, tmp_path, capsys):
    folder, _ = built
    params = write_params(tmp_path, train=50, test=20)
    assert main(["data", "import", "--params", str(params)]) == 0
    with pytest.raises(MapetError, match="made for another manifest"):
        load_tokens(folder / "tokens", tmp_path / "data")


def test_encoder_grid_mismatch_stops_the_build(built, capsys):
    folder, _ = built
    params = write_params(folder, encoder={"kind": "efficientnet-lite0", "input_size": 224})
    assert main(["tokenizer", "build", "--params", str(params)]) == 2
    assert "gives a 14x14 feature grid, but the ViT has 7x7 patches" in capsys.readouterr().err
