"""VQ-KD tokens (tokenizer.encoder.kind: vqkd): a checkpoint in the layout of BEiT v2's released
tokenizer, made here with random weights, against a float64 reference of that layout."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pretrain import FASHION_MNIST

from mapet.cli import main
from mapet.tokenizers.codebook import load_codebook, nearest
from mapet.tokenizers.encoders import VQKDEncoder
from mapet.tokenizers.tokens import load_tokens

DIM, DEPTH, PATCH, IMAGE, CODE_DIM, CODES = 64, 2, 16, 32, 8, 16


def release_state(seed=0) -> dict:
    """Random weights in the release's layout, decoder, quantizer statistics and teacher included."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    state = {"encoder.cls_token": rand(1, 1, DIM), "encoder.pos_embed": rand(1, 1 + (IMAGE // PATCH) ** 2, DIM),
             "encoder.patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.05),
             "encoder.patch_embed.proj.bias": rand(DIM), "encoder.fc_norm.weight": 1 + rand(DIM),
             "encoder.fc_norm.bias": rand(DIM), "encode_task_layer.0.weight": rand(DIM, DIM),
             "encode_task_layer.0.bias": rand(DIM), "encode_task_layer.2.weight": rand(CODE_DIM, DIM),
             "encode_task_layer.2.bias": rand(CODE_DIM),
             "quantize.embedding.weight": F.normalize(rand(CODES, CODE_DIM), dim=-1),
             "quantize.embedding.cluster_size": rand(CODES), "quantize.embedding.embed_avg": rand(CODES, CODE_DIM),
             "quantize.embedding.initted": torch.ones(1), "quantize.cluster_size": rand(CODES),
             "decoder.pos_embed": rand(1, 5, DIM), "decode_task_layer.0.weight": rand(DIM, DIM),
             "teacher_model.visual.proj": rand(4, 4), "scaling_layer.shift": rand(1, 3, 1, 1)}
    for i in range(DEPTH):
        block = f"encoder.blocks.{i}."
        state.update({block + "norm1.weight": 1 + rand(DIM), block + "norm1.bias": rand(DIM),
                      block + "attn.qkv.weight": rand(3 * DIM, DIM, scale=0.1), block + "attn.q_bias": rand(DIM),
                      block + "attn.v_bias": rand(DIM), block + "attn.proj.weight": rand(DIM, DIM, scale=0.1),
                      block + "attn.proj.bias": rand(DIM), block + "norm2.weight": 1 + rand(DIM),
                      block + "norm2.bias": rand(DIM), block + "mlp.fc1.weight": rand(4 * DIM, DIM, scale=0.1),
                      block + "mlp.fc1.bias": rand(4 * DIM), block + "mlp.fc2.weight": rand(DIM, 4 * DIM, scale=0.1),
                      block + "mlp.fc2.bias": rand(DIM)})
    return state


def reference_tokens(w: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(code vectors, tokens) of images in [0, 1], as the release computes them, in float64."""
    w = {key: value.double() for key, value in w.items()}
    x = images.double() * 2 - 1
    x = F.conv2d(x, w["encoder.patch_embed.proj.weight"], w["encoder.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([w["encoder.cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + w["encoder.pos_embed"]
    heads = DIM // 64
    for i in range(DEPTH):
        b = {key.removeprefix(f"encoder.blocks.{i}."): value for key, value in w.items()
             if key.startswith(f"encoder.blocks.{i}.")}
        h = F.layer_norm(x, (DIM,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        bias = torch.cat([b["attn.q_bias"], torch.zeros_like(b["attn.q_bias"]), b["attn.v_bias"]])
        q, k, v = (h @ b["attn.qkv.weight"].T + bias).split(DIM, dim=-1)
        split = lambda t: t.view(len(t), -1, heads, DIM // heads).transpose(1, 2)  # noqa: E731
        attention = ((split(q) * (DIM // heads) ** -0.5) @ split(k).transpose(-2, -1)).softmax(-1)
        x = x + (attention @ split(v)).transpose(1, 2).reshape(len(x), -1, DIM) @ b["attn.proj.weight"].T \
            + b["attn.proj.bias"]
        h = F.layer_norm(x, (DIM,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        x = x + F.gelu(h @ b["mlp.fc1.weight"].T + b["mlp.fc1.bias"]) @ b["mlp.fc2.weight"].T + b["mlp.fc2.bias"]
    patches = F.layer_norm(x[:, 1:], (DIM,), w["encoder.fc_norm.weight"], w["encoder.fc_norm.bias"], eps=1e-6)
    hidden = torch.tanh(patches @ w["encode_task_layer.0.weight"].T + w["encode_task_layer.0.bias"])
    z = F.normalize(hidden @ w["encode_task_layer.2.weight"].T + w["encode_task_layer.2.bias"], dim=-1)
    codes = w["quantize.embedding.weight"]
    distance = (z ** 2).sum(-1, keepdim=True) + (codes ** 2).sum(-1) - 2 * z @ codes.T
    return z, distance.argmin(-1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vqkd") / "vqkd_encoder_base_decoder_3x768x12_clip.pth"
    torch.save({"model": release_state(), "epoch": 99}, path)
    return path


def test_the_encoder_and_codebook_compute_the_release_tokens(checkpoint):
    encoder = VQKDEncoder(str(checkpoint))
    assert encoder.mean == (0.5, 0.5, 0.5) and encoder.grid_and_dim() == ((2, 2), CODE_DIM)
    encoder = encoder.double()
    images = torch.rand(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = encoder((images.double() - 0.5) / 0.5).flatten(1, 2)
    z, expected = reference_tokens(release_state(), images)
    torch.testing.assert_close(ours, z, rtol=1e-10, atol=1e-10)
    tokens = nearest(encoder.codebook, ours.reshape(-1, CODE_DIM).float().numpy()).reshape(4, -1)
    np.testing.assert_array_equal(tokens, expected.numpy())


def test_tokenizer_build_copies_the_codebook_and_tokenize_uses_it(checkpoint, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "data": {"dir": str(tmp_path / "data"), "format": "fashion-mnist", "source": FASHION_MNIST,
                 "max_per_split": {"train": 16, "test": 8}, "shard_size": 8, "workers": 1},
        "model": {"img_size": IMAGE, "patch_size": PATCH},
        "tokenizer": {"encoder": {"kind": "vqkd", "pretrained": str(checkpoint)}, "out_dir": str(tmp_path / "tok"),
                      "split": "train", "sample_images": 8, "max_vectors": 100, "k": 8192},
        "tokenize": {"batch_size": 8, "workers": 0, "out_dir": str(tmp_path / "tokens")}}))
    for command in (["data", "import"], ["tokenizer", "build"], ["tokenize"]):
        assert main([*command, "--params", str(params)]) == 0
    codebook = load_codebook(tmp_path / "tok" / "codebook.safetensors")
    np.testing.assert_array_equal(codebook.centroids, release_state()["quantize.embedding.weight"].numpy())
    assert codebook.metadata["copied_from"]["checkpoint"] == str(checkpoint) and codebook.k == CODES
    tokens, description = load_tokens(tmp_path / "tokens", tmp_path / "data", expected_grid=(2, 2))
    assert tokens.shape == (24, 4) and description["k"] == CODES and description["encoder"]["kind"] == "vqkd"
    assert int(tokens.max()) < CODES


def test_a_missing_checkpoint_says_where_to_get_it(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": {"dir": str(tmp_path)}, "model": {"img_size": 224, "patch_size": 16},
                                  "tokenizer": {"encoder": {"kind": "vqkd", "pretrained": "/models/vqkd.pth"},
                                                "out_dir": str(tmp_path / "tok")}}))
    assert main(["tokenizer", "build", "--params", str(params)]) == 2
    error = capsys.readouterr().err
    assert "no VQ-KD checkpoint at '/models/vqkd.pth'" in error and "vqkd_encoder_base_decoder_3x768x12_clip" in error


def test_a_checkpoint_outside_the_layout_is_refused_naming_the_weight(tmp_path):
    state = release_state()
    state["encode_task_layer.4.weight"] = torch.zeros(2, 2)
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(Exception, match="encode_task_layer.4.weight"):
        VQKDEncoder(str(tmp_path / "odd.pth"))
