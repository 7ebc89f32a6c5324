import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mapet.cli import main
from mapet.data.dataset import read_manifest
from mapet.data.reader import ShardDataset
from mapet.data.transforms import eval_transform, finetune_transform, normalize_batch, pretrain_transform

CLASSES = ["cat", "dog", "fox"]


def png(seed, size=(32, 32), mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, per_class=4) -> Path:
    seed = 0
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                (root / split / name / f"{i:03d}.png").write_bytes(png(seed))
    return root


def write_params(tmp_path: Path, **validate) -> Path:
    limits = {"min_size": 16, "max_size": 64, "modes": ["RGB", "L"], "min_images_per_class": 2,
              "min_class_share": 0.5, "workers": 1, **validate}
    params = {"data": {"dir": str(tmp_path / "data"), "format": "imagefolder", "source": str(tmp_path / "src"),
                       "max_per_split": {}, "shard_size": 3, "workers": 1},
              "validate": {"report_dir": str(tmp_path / "report"), **limits}}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(params))  # JSON is YAML
    return path


@pytest.fixture
def dataset(tmp_path):
    image_folder(tmp_path / "src")
    params = write_params(tmp_path)
    assert main(["data", "import", "--params", str(params)]) == 0
    return tmp_path, params


def run_validate(params, capsys):
    code = main(["validate", "--params", str(params)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    report = json.loads((Path(params).parent / "report" / "validation.json").read_text())
    failed = {rule["rule"]: rule["offenders"] for rule in report["rules"] if not rule["success"]}
    return code, failed, captured


def test_clean_dataset_passes_and_writes_reports(dataset, capsys):
    tmp_path, params = dataset
    code, failed, captured = run_validate(params, capsys)
    assert code == 0 and failed == {}
    assert "passes all 13 validation rules" in captured.out
    assert "Data validation" in (tmp_path / "report" / "validation.html").read_text()


def test_manifest_has_one_row_per_image_with_its_facts(dataset):
    tmp_path, _ = dataset
    manifest = read_manifest(tmp_path / "data")
    assert list(manifest.columns) == ["key", "source_path", "split", "label", "class_name", "shard", "bytes",
                                      "sha256", "width", "height", "mode"]
    assert len(manifest) == 24 and set(manifest["split"]) == {"train", "val"}
    row = manifest.iloc[0]
    assert (row.width, row.height, row["mode"]) == (32, 32, "RGB") and row.key == "train_00000000"
    assert row.source_path == f"train/{row.class_name}/{row.source_path.split('/')[-1]}"
    assert sorted(manifest["source_path"]) == sorted(f"{split}/{name}/{i:03d}.png" for split in ("train", "val")
                                                     for name in CLASSES for i in range(4))
    assert row.shard == "shards/train-00000.tar"
    assert manifest.groupby("split")["shard"].nunique().to_dict() == {"train": 4, "val": 4}


def test_shards_and_the_first_images_mix_the_classes(tmp_path):
    image_folder(tmp_path / "src", per_class=8)                       # folders sorted by class, 8 of each
    params = write_params(tmp_path)
    assert main(["data", "import", "--params", str(params)]) == 0
    train = read_manifest(tmp_path / "data").query("split == 'train'")
    classes_per_shard = train.groupby("shard")["class_name"].nunique()
    assert classes_per_shard.mean() > 2                                 # shards of 3: not one class each
    assert train["class_name"].iloc[:12].nunique() == 3                # max_per_split's first N: every class


def test_import_is_deterministic(tmp_path):
    image_folder(tmp_path / "src")
    for out in ("a", "b"):
        assert main(["data", "import", "--params", str(write_params(tmp_path)), "--out", str(tmp_path / out)]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 10  # 8 shards, manifest, description
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_fashion_mnist_import_is_deterministic(tmp_path):
    source = Path("/usr/share/datasets/fashion-mnist")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": {"format": "fashion-mnist", "source": str(source), "shard_size": 50,
                                           "max_per_split": {"train": 120, "test": 30}, "workers": 2}}))
    for out in ("a", "b"):
        assert main(["data", "import", "--params", str(params), "--out", str(tmp_path / out)]) == 0
    for name in ("manifest.parquet", "shards/train-00002.tar", "shards/test-00000.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifest = read_manifest(tmp_path / "a")
    assert manifest["split"].value_counts().to_dict() == {"train": 120, "test": 30}
    assert set(manifest["mode"]) == {"L"} and set(manifest["width"]) == {28}
    assert manifest["class_name"].iloc[0] == "Ankle boot"  # the first training image of Fashion-MNIST
    assert manifest.set_index("key")["source_path"][["train_00000005", "test_00000029"]].tolist() == [
        "train-images-idx3-ubyte.gz#5", "t10k-images-idx3-ubyte.gz#29"]


@pytest.mark.parametrize("bad_bytes,reason", [
    (lambda: png(99)[:60], "cannot be decoded as an image"),
    (lambda: b"", "zero-byte file"),
    (lambda: b"name,label\nthis is a csv file,3\n", "cannot be decoded as an image"),
])
def test_unreadable_source_files_are_listed_and_refused(tmp_path, capsys, bad_bytes, reason):
    image_folder(tmp_path / "src")
    bad = tmp_path / "src" / "train" / "dog" / "bad.png"
    bad.write_bytes(bad_bytes())
    params = write_params(tmp_path)
    assert main(["data", "import", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: {reason}" in err and "Traceback" not in err
    assert read_manifest(tmp_path / "data")["split"].value_counts().to_dict() == {"train": 12, "val": 12}
    code, failed, _ = run_validate(params, capsys)
    assert code == 2
    assert list(failed) == ["import: every source file could be read"]
    assert failed["import: every source file could be read"][0].startswith(f"train/dog/bad.png ({reason}")


def rewrite_shard(path: Path, key: str, image: bytes | None = None) -> None:
    """Drop ``key``'s members from the shard, or replace its image file by ``image``."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            if member.name.startswith(key):
                if image is None:
                    continue
                if member.name.endswith(".png"):
                    data, member.size = image, len(image)
            tar.addfile(member, io.BytesIO(data))


def named(manifest, source_path: str) -> str:
    """How validation names an image: its path in the source, then its key."""
    return f"{source_path} ({manifest.set_index('source_path').loc[source_path, 'key']})"


def shard_and_key(root: Path, source_path: str) -> tuple[Path, str]:
    row = read_manifest(root).set_index("source_path").loc[source_path]
    return root / row["shard"], row["key"]


def test_image_missing_from_its_shard(dataset, capsys):
    tmp_path, params = dataset
    rewrite_shard(*shard_and_key(tmp_path / "data", "val/dog/000.png"))
    code, failed, captured = run_validate(params, capsys)
    offender = named(read_manifest(tmp_path / "data"), "val/dog/000.png")
    assert code == 2 and failed == {"shard: every listed image is present in its shard": [offender]}
    assert f"FAIL shard: every listed image is present in its shard: 1 offending ({offender})" in captured.out


@pytest.mark.parametrize("replacement,rules", [
    (png(5), ["shard: sha256 matches the manifest"]),
    (png(5)[:100], ["shard: every image decodes", "shard: sha256 matches the manifest"]),
])
def test_image_changed_inside_its_shard(dataset, capsys, replacement, rules):
    tmp_path, params = dataset
    rewrite_shard(*shard_and_key(tmp_path / "data", "train/dog/003.png"), replacement)
    code, failed, _ = run_validate(params, capsys)
    offender = named(read_manifest(tmp_path / "data"), "train/dog/003.png")
    assert code == 2 and list(failed) == rules
    assert failed["shard: sha256 matches the manifest"] == [offender]
    if "shard: every image decodes" in failed:
        [problem] = failed["shard: every image decodes"]
        assert problem.startswith(f"{offender}: cannot be decoded as an image")


def edit_manifest(root: Path, edit) -> None:
    table = pq.read_table(root / "manifest.parquet").to_pandas()
    edit(table)
    pq.write_table(pq.read_table(root / "manifest.parquet").from_pandas(table, preserve_index=False),
                   root / "manifest.parquet")


def test_label_outside_class_list(dataset, capsys):
    tmp_path, params = dataset
    edit_manifest(tmp_path / "data",
                  lambda t: t.__setitem__("label", t["label"].where(t["source_path"] != "train/cat/002.png", 7)))
    code, failed, _ = run_validate(params, capsys)
    offender = named(read_manifest(tmp_path / "data"), "train/cat/002.png")
    assert code == 2 and failed == {"label: within the class list": [offender]}


def import_and_validate(tmp_path, capsys, extra_files, **limits):
    """The standard image folder plus ``extra_files`` (path under src/ -> bytes), imported and validated."""
    image_folder(tmp_path / "src")
    for name, data in extra_files.items():
        (tmp_path / "src" / name).write_bytes(data)
    params = write_params(tmp_path, **limits)
    assert main(["data", "import", "--params", str(params)]) == 0
    code, failed, _ = run_validate(params, capsys)
    assert code == 2
    return failed, read_manifest(tmp_path / "data")


def test_duplicate_across_splits_is_leakage(tmp_path, capsys):
    leaked = png(2)  # the second image written by image_folder: train/cat/001.png
    failed, manifest = import_and_validate(tmp_path, capsys, {"val/fox/leaked.png": leaked})
    assert list(failed) == ["leakage: no image in more than one split"]
    train, val = named(manifest, "train/cat/001.png"), named(manifest, "val/fox/leaked.png")
    assert sorted(failed["leakage: no image in more than one split"]) == [
        f"{train}, same image as {val}", f"{val}, same image as {train}"]


def test_duplicate_within_split(tmp_path, capsys):
    failed, manifest = import_and_validate(tmp_path, capsys, {"train/cat/copy.png": png(1)})
    first, copy = named(manifest, "train/cat/000.png"), named(manifest, "train/cat/copy.png")
    assert {key: sorted(value) for key, value in failed.items()} == {"duplicates: no image twice within a split": sorted([
        f"{first}, same image as {copy}", f"{copy}, same image as {first}"])}


def test_image_below_minimum_size(tmp_path, capsys):
    failed, manifest = import_and_validate(tmp_path, capsys, {"val/dog/tiny.png": png(7, size=(8, 40))})
    assert failed == {"size: width within 16..64": [named(manifest, "val/dog/tiny.png")]}


def test_class_counts_and_balance(tmp_path, capsys):
    extra = {f"train/cat/x{i}.png": png(1000 + i) for i in range(6)}
    failed, _ = import_and_validate(tmp_path, capsys, extra, min_images_per_class=5)
    assert sorted(failed["classes: at least 5 images per class and split"]) == [
        "train/dog", "train/fox", "val/cat", "val/dog", "val/fox"]
    assert sorted(failed["classes: balanced (each at least 50% of its split's largest)"]) == ["train/dog", "train/fox"]


def test_report_and_messages_name_source_files(tmp_path, capsys):
    """A leaked, a duplicated and an undecodable file: each is named by its path in the source."""
    image_folder(tmp_path / "src")
    extra = {"val/fox/leaked.png": png(2), "train/dog/again.png": png(5), "train/fox/broken.png": png(9)[:50]}
    for name, data in extra.items():
        (tmp_path / "src" / name).write_bytes(data)
    params = write_params(tmp_path)
    assert main(["data", "import", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/src/train/fox/broken.png: cannot be decoded" in err and "Traceback" not in err
    code, failed, captured = run_validate(params, capsys)
    assert code == 2 and "Traceback" not in captured.err
    assert set(failed) == {"import: every source file could be read", "duplicates: no image twice within a split",
                           "leakage: no image in more than one split"}
    assert failed["import: every source file could be read"][0].startswith("train/fox/broken.png (cannot be decoded")
    manifest = read_manifest(tmp_path / "data")
    dog, again = named(manifest, "train/dog/000.png"), named(manifest, "train/dog/again.png")
    assert sorted(failed["duplicates: no image twice within a split"]) == sorted([
        f"{dog}, same image as {again}", f"{again}, same image as {dog}"])
    leaked, original = named(manifest, "val/fox/leaked.png"), named(manifest, "train/cat/001.png")
    assert f"{leaked}, same image as {original}" in failed["leakage: no image in more than one split"]
    page = (tmp_path / "report" / "validation.html").read_text()
    assert all(name in page for name in extra)
    assert leaked in captured.out


def test_manifest_without_source_paths_names_images_by_key(dataset, capsys):
    """A manifest written before source paths were kept still reads and validates."""
    tmp_path, params = dataset
    def edit(table):
        del table["source_path"]
        table["label"] = table["label"].where(table["key"] != "train_00000002", 7)
    edit_manifest(tmp_path / "data", edit)
    assert set(read_manifest(tmp_path / "data")["source_path"]) == {""}
    code, failed, _ = run_validate(params, capsys)
    assert code == 2 and failed == {"label: within the class list": ["train_00000002"]}


def test_validating_other_data_writes_its_report_beside_it(dataset, capsys):
    """Only data.dir's report goes to validate.report_dir; other data gets DATA-validation/."""
    tmp_path, params = dataset
    assert main(["validate", "--params", str(params)]) == 0
    tracked = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (tmp_path / "report").iterdir()}
    assert len(tracked) == 2
    other = tmp_path / "elsewhere" / "other"
    assert main(["data", "import", "--params", str(params), "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["validate", "--params", str(params), "--data", str(other)]) == 0
    assert f"report: {other}-validation/validation.html" in capsys.readouterr().out
    assert tracked == {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (tmp_path / "report").iterdir()}
    assert json.loads((tmp_path / "elsewhere" / "other-validation" / "validation.json").read_text())["dataset"] == \
        str(other)
    assert sorted(path.name for path in other.iterdir()) == ["dataset.json", "manifest.parquet", "shards"]
    assert main(["validate", "--params", str(params), "--data", f"{tmp_path}/./data/"]) == 0  # data.dir, spelt otherwise
    assert f"report: {tmp_path}/report/validation.html" in capsys.readouterr().out


def test_missing_dataset_is_one_clear_message(tmp_path, capsys):
    params = write_params(tmp_path)
    assert main(["validate", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/data/manifest.parquet: no manifest" in err and "Traceback" not in err
    assert main(["data", "import", "--params", str(params)]) == 2
    assert f"{tmp_path}/src: not a folder" in capsys.readouterr().err


def test_round_trip_import_to_reader(dataset):
    tmp_path, _ = dataset
    manifest = read_manifest(tmp_path / "data")
    seen = {key: (label, image) for image, label, key in ShardDataset(tmp_path / "data", "val")}
    rows = manifest[manifest["split"] == "val"]
    assert sorted(seen) == sorted(rows["key"])
    for row in rows.itertuples():
        label, image = seen[row.key]
        assert label == row.label and image.size == (row.width, row.height) and image.mode == "RGB"
    for row in rows.itertuples():                                          # every image, pixel for pixel
        assert np.array_equal(np.asarray(seen[row.key][1]), np.asarray(Image.open(tmp_path / "src" / row.source_path)))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_and_workers_read_every_key_exactly_once(dataset, world_size):
    tmp_path, _ = dataset
    keys = []
    for rank in range(world_size):
        data = ShardDataset(tmp_path / "data", "train", transform=pretrain_transform(16), shuffle=True, seed=3,
                            rank=rank, world_size=world_size)
        data.set_epoch(1)
        loader = DataLoader(data, batch_size=2, num_workers=2)
        for images, labels, batch_keys in loader:
            assert images.shape[1:] == (3, 16, 16)
            keys.extend(batch_keys)
    manifest = read_manifest(tmp_path / "data")
    assert sorted(keys) == sorted(manifest[manifest["split"] == "train"]["key"])


def test_shuffle_changes_with_epoch_and_is_seeded(dataset):
    tmp_path, _ = dataset
    data = ShardDataset(tmp_path / "data", "train", shuffle=True, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        data.set_epoch(epoch)
        orders.append([key for _, _, key in data])
    assert orders[0] == orders[2] and orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_transforms_at_demo_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 28, 3), dtype=np.uint8))
    pre = pretrain_transform(28)
    assert torch.equal(pre(image), pre(image))  # deterministic: no random crop or flip
    centre = image.crop((0, 6, 28, 34))
    assert torch.allclose(pre(image), pre(centre))  # the centre square, resized
    raw = pretrain_transform(28, normalize=False)(image)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 28, 28)
    torch.testing.assert_close(normalize_batch(raw[None], torch.float32)[0], pre(image), rtol=0, atol=1e-6)
    assert finetune_transform(28)(image).shape == (3, 28, 28)
    assert eval_transform(28)(image).shape == (3, 28, 28)
