"""`mapet weights import --from official-mapet`: checkpoints in the layouts of the paper's code
(split q / kv attention), made here with random weights, against a float64 reference of that
layout written from its own weights."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_pretrain import TINY_VIT, finish, launch, tokens, weights, write_params  # noqa: F401 (fixture)

from mapet.cli import main
from mapet.models import load_classifier, load_pretrain_model

DIM, DEPTH, HEADS, PATCH, IMAGE = 128, 2, 2, 16, 32


def official_state(dim=DIM, depth=DEPTH, patch=PATCH, image=IMAGE, classes=5, vocab=None, seed=0) -> dict:
    """A random state dict in the official layout: a classifier, or with ``vocab`` the pre-training model."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    positions = 1 + (image // patch) ** 2
    state = {"cls_token": rand(1, 1, dim), "pos_embed": rand(1, positions, dim),
             "patch_embed.proj.weight": rand(dim, 3, patch, patch, scale=0.05), "patch_embed.proj.bias": rand(dim)}
    for i in range(depth):
        block = f"blocks.{i}."
        state.update({block + "norm1.weight": 1 + rand(dim), block + "norm1.bias": rand(dim),
                      block + "attn.q.weight": rand(dim, dim, scale=0.1), block + "attn.q.bias": rand(dim),
                      block + "attn.kv.weight": rand(2 * dim, dim, scale=0.1), block + "attn.kv.bias": rand(2 * dim),
                      block + "attn.proj.weight": rand(dim, dim, scale=0.1), block + "attn.proj.bias": rand(dim),
                      block + "ls1.gamma": rand(dim), block + "norm2.weight": 1 + rand(dim),
                      block + "norm2.bias": rand(dim), block + "mlp.fc1.weight": rand(4 * dim, dim, scale=0.1),
                      block + "mlp.fc1.bias": rand(4 * dim), block + "mlp.fc2.weight": rand(dim, 4 * dim, scale=0.1),
                      block + "mlp.fc2.bias": rand(dim), block + "ls2.gamma": rand(dim)})
    if vocab:
        state.update({"norm.weight": 1 + rand(dim), "norm.bias": rand(dim), "mask_positional_token": rand(1, 1, dim),
                      "decoder.weight": rand(vocab, dim), "decoder.bias": rand(vocab)})
    else:
        state.update({"fc_norm.weight": 1 + rand(dim), "fc_norm.bias": rand(dim), "head.weight": rand(classes, dim),
                      "head.bias": rand(classes)})
    return state


def save_official(path, state, under="state_dict"):
    """As timm's CheckpointSaver writes it: the weights beside the epoch and the training arguments."""
    document = {"epoch": 99, "arch": "vit_standard_tiny_patch16_224", "args": argparse.Namespace(lr=1e-3, gp="avg")}
    document[under] = state
    torch.save(document if under else state, path)
    return path


def reference_trunk(w: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """The official blocks from their own weights, in float64: separate q and kv projections."""
    w = {key: value.double() for key, value in w.items()}
    dim = w["cls_token"].shape[-1]
    patch = w["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(images.double(), w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([w["cls_token"].expand(len(images), -1, -1), x.flatten(2).transpose(1, 2)], 1) + w["pos_embed"]
    depth = 1 + max(int(key.split(".")[1]) for key in w if key.startswith("blocks."))
    for i in range(depth):
        b = {key.removeprefix(f"blocks.{i}."): value for key, value in w.items() if key.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (dim,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        q = h @ b["attn.q.weight"].T + b["attn.q.bias"]
        kv = h @ b["attn.kv.weight"].T + b["attn.kv.bias"]
        k, v = kv[..., :dim], kv[..., dim:]
        split = lambda t: t.view(len(t), -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
        attention = ((split(q) @ split(k).transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        mixed = (attention @ split(v)).transpose(1, 2).reshape(len(x), -1, dim)
        x = x + b["ls1.gamma"] * (mixed @ b["attn.proj.weight"].T + b["attn.proj.bias"])
        h = F.layer_norm(x, (dim,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        hidden = F.gelu(h @ b["mlp.fc1.weight"].T + b["mlp.fc1.bias"])
        x = x + b["ls2.gamma"] * (hidden @ b["mlp.fc2.weight"].T + b["mlp.fc2.bias"])
    return x


def run(*argv) -> int:
    return main([str(part) for part in argv])


@pytest.mark.parametrize("under", ["state_dict", "model", "state_dict_ema", None])
def test_an_official_classifier_computes_the_same_function(tmp_path, under):
    state = official_state()
    if under == "model":
        state = {"module." + key: value for key, value in state.items()}       # saved from DDP
    source = save_official(tmp_path / "vit_standard.pth.tar", state, under)
    assert run("weights", "import", "--from", "official-mapet", source, "--out", tmp_path / "model.safetensors") == 0

    model, classes, provenance = load_classifier(tmp_path / "model.safetensors")
    assert classes == [f"class_{i}" for i in range(5)] and provenance["imported"]["weights"] == (under or "the top level")
    assert model.global_pool == "avg" and model.patch_embed.img_size == (IMAGE, IMAGE)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.double().eval()(images.double())
    plain = {key.removeprefix("module."): value for key, value in state.items()}
    trunk = reference_trunk(plain, images, HEADS)
    pooled = F.layer_norm(trunk[:, 1:].mean(1), (DIM,), plain["fc_norm.weight"].double(), plain["fc_norm.bias"].double(),
                          eps=1e-6)
    expected = pooled @ plain["head.weight"].double().T + plain["head.bias"].double()
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_the_official_pretraining_model_becomes_a_pretraining_model_file(tmp_path):
    state = official_state(vocab=64)
    source = save_official(tmp_path / "mapet_base.pth", state)
    assert run("weights", "import", "--from", "official-mapet", source, "--out", tmp_path / "pretrain.safetensors") == 0

    model = load_pretrain_model(tmp_path / "pretrain.safetensors")
    assert model.objective == "mapet" and model.vocab_size == 64
    torch.testing.assert_close(model.mask_token, state["mask_positional_token"], rtol=0, atol=0)
    torch.testing.assert_close(model.token_head.weight, state["decoder.weight"], rtol=0, atol=0)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.backbone.double().eval().forward_features(images.double())
    expected = F.layer_norm(reference_trunk(state, images, HEADS), (DIM,), state["norm.weight"].double(),
                            state["norm.bias"].double(), eps=1e-6)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)

    assert run("export", "--model", tmp_path / "pretrain.safetensors", "--out", tmp_path / "backbone.safetensors") == 0
    backbone = load_file(str(tmp_path / "backbone.safetensors"))
    torch.testing.assert_close(backbone["blocks.1.attn.qkv.weight"],
                               torch.cat([state["blocks.1.attn.q.weight"], state["blocks.1.attn.kv.weight"]]))


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update({"blocks.0.attn.extra.weight": torch.zeros(1)}), "outside the official MaPeT layout: "
                                                                        "blocks.0.attn.extra.weight"),
    (lambda s: s.pop("blocks.1.attn.kv.weight"), "'blocks.1.attn.q.weight' has no blocks.1.attn.kv.'weight'"),
    (lambda s: s.pop("blocks.1.mlp.fc2.bias"), "missing blocks.1.mlp.fc2.bias"),
    (lambda s: s.update({"head.weight": torch.zeros(5, 7)}), "shapes head.weight (5, 7)"),
    (lambda s: s.update({"pos_embed": torch.zeros(1, 6, DIM)}), "'pos_embed' has 6 rows"),
    (lambda s: s.pop("cls_token"), "no 'cls_token'"),
])
def test_a_checkpoint_outside_the_layout_is_refused_naming_the_weight(tmp_path, capsys, damage, message):
    state = official_state()
    damage(state)
    source = save_official(tmp_path / "bad.pth", state)
    assert run("weights", "import", "--from", "official-mapet", source, "--out", tmp_path / "out.safetensors") == 2
    error = capsys.readouterr().err
    assert message in error and str(source) in error and "Traceback" not in error
    assert not (tmp_path / "out.safetensors").exists()


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "notes.pth").write_bytes(b"not a checkpoint at all")
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=1.0)}, tmp_path / "empty.pth")
    assert run("weights", "import", "--from", "official-mapet", tmp_path / "notes.pth", "--out", tmp_path / "o") == 2
    assert "not a PyTorch checkpoint that can be read safely" in capsys.readouterr().err
    assert run("weights", "import", "--from", "official-mapet", tmp_path / "empty.pth", "--out", tmp_path / "o") == 2
    assert "no state dict at the top level or under state_dict, model, state_dict_ema (the file holds: epoch, args)" \
        in capsys.readouterr().err


@pytest.mark.slow
def test_pretraining_starts_from_an_imported_model(tokens, tmp_path):
    data, token_dir = tokens
    dim, depth = TINY_VIT["embed_dim"], TINY_VIT["depth"]
    state = official_state(dim=dim, depth=depth, patch=TINY_VIT["patch_size"], image=TINY_VIT["img_size"], vocab=16)
    source = save_official(tmp_path / "official.pth", state)
    init = tmp_path / "init.safetensors"
    assert run("weights", "import", "--from", "official-mapet", source, "--out", init, "--num-heads", 2) == 0
    # a learning rate of 1e-30: the run ends where it started, so every weight came from the file
    params = write_params(tmp_path, data, token_dir, init=str(init), lr=1e-30, warmup_lr=1e-30, min_lr=1e-30, epochs=1)
    output = finish(launch(params))
    assert f"from {init}" in output
    started = load_file(str(init))
    ended = weights(tmp_path)
    assert set(ended) == set(started)
    for name, tensor in started.items():
        torch.testing.assert_close(ended[name], tensor, rtol=0, atol=1e-12)

    wrong = write_params(tmp_path, data, token_dir, init=str(init), epochs=1)
    document = json.loads(wrong.read_text())
    document["model"]["embed_dim"] = 64
    wrong.write_text(json.dumps(document))
    process = launch(wrong)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0 and f"{init}: does not fit the model" in output


@pytest.mark.slow
def test_mapet_evaluate_runs_an_imported_classifier_with_the_data_class_names(tokens, tmp_path):
    data, _ = tokens
    source = save_official(tmp_path / "vit_standard.tar", official_state(classes=10))
    model = tmp_path / "classifier.safetensors"
    assert run("weights", "import", "--from", "official-mapet", source, "--out", model, "--classes-from", data) == 0
    _, classes, _ = load_classifier(model)
    assert classes[:2] == ["T-shirt/top", "Trouser"]
    assert run("evaluate", "--model", model, "--data", data, "--split", "test", "--out", tmp_path / "evaluate") == 0
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["images"] == 16 and 0 <= metrics["top1"] <= 1 and metrics["imported"]["from"] == "official-mapet"
