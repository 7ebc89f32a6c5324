import json

import pytest
import timm
import torch
import torch.nn.functional as F

from mapet.cli import main
from mapet.masking import ranks_from_orders, sample_orders, two_stream_mask
from mapet.models import (create_pretrain_model, export_backbone, load_pretrain_model, save_pretrain_model)

TINY = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.0)
GRID, N, VOCAB = (4, 4), 16, 11


def tiny(objective, **overrides):
    torch.manual_seed(0)
    return create_pretrain_model(objective, "vit_tiny_patch16_224", VOCAB, **{**TINY, **overrides})


def patch_dependence(model, images, order, num_predict):
    """dep[b, t, c, k]: does logits[b, t] depend on the pixels of patch k of image c?"""
    images = images.clone().requires_grad_(True)
    logits = model(images, order, num_predict)
    batch = images.shape[0]
    dep = torch.zeros(batch, num_predict, batch, N, dtype=torch.bool)
    for b in range(batch):
        for t in range(num_predict):
            (grad,) = torch.autograd.grad(logits[b, t].sum(), images, retain_graph=True)
            per_patch = grad.abs().unfold(2, 4, 4).unfold(3, 4, 4).sum(dim=(1, 4, 5))  # (B, 4, 4)
            dep[b, t] = per_patch.flatten(1) > 0
    return dep


@pytest.mark.parametrize("objective", ["mapet", "plm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuted_logits_depend_on_exactly_context_and_earlier_predictions(objective, seed):
    model = tiny(objective).double().eval()
    generator = torch.Generator().manual_seed(seed)
    num_predict = 5 + seed * 3
    order = sample_orders(objective, 2, GRID, num_predict, generator)
    images = torch.randn(2, 3, 16, 16, generator=generator, dtype=torch.float64)
    dep = patch_dependence(model, images, order, num_predict)
    for b in range(2):
        for t in range(num_predict):
            visible = order[b, : N - num_predict + t]  # context, then predictions before t
            expected = torch.zeros(N, dtype=torch.bool)
            expected[visible] = True
            assert torch.equal(dep[b, t, b], expected), (b, t)
            assert not dep[b, t, 1 - b].any(), "an image depends on another image of the batch"


def test_mim_logits_never_depend_on_masked_pixels():
    model = tiny("mim").double().eval()
    generator = torch.Generator().manual_seed(0)
    order = sample_orders("mim", 2, GRID, 6, generator, min_block=2)
    images = torch.randn(2, 3, 16, 16, generator=generator, dtype=torch.float64)
    dep = patch_dependence(model, images, order, 6)
    for b in range(2):
        expected = torch.ones(N, dtype=torch.bool)
        expected[order[b, -6:]] = False
        for t in range(6):
            assert torch.equal(dep[b, t, b], expected)
            assert not dep[b, t, 1 - b].any()


@pytest.mark.parametrize("objective", ["mapet", "plm", "mim"])
def test_logits_shape_and_alignment_with_order(objective):
    model = tiny(objective).eval()
    order = sample_orders(objective, 3, GRID, 7, torch.Generator().manual_seed(0), min_block=2)
    logits = model(torch.randn(3, 3, 16, 16), order, 7)
    assert logits.shape == (3, 7, VOCAB)


def reference_two_stream_logits(model, images, order, num_predict):
    """METHOD.md section 4 spelled out: raster-order content stream, per-image dense masks."""
    backbone, dim = model.backbone, model.backbone.embed_dim
    batch, num_patches = order.shape
    patches = backbone.patch_embed(images) + backbone.pos_embed[:, 1:]
    cls = (backbone.cls_token + backbone.pos_embed[:, :1]).expand(batch, -1, -1)
    query = model.mask_token + backbone.pos_embed[0, 1:][order[:, num_patches - num_predict:]]
    content = torch.cat([cls, patches, query] if model.mask_tokens else [cls, patches], dim=1)
    mask = two_stream_mask(ranks_from_orders(order), num_predict, model.mask_tokens)[:, None]
    heads = lambda t: t.unflatten(2, (block.attn.num_heads, -1)).transpose(1, 2)  # noqa: E731
    for block in backbone.blocks:
        rows, num_content = torch.cat([content, query], dim=1), content.shape[1]
        q, k, v = block.attn.qkv(block.norm1(rows)).split(dim, dim=2)
        out = F.scaled_dot_product_attention(heads(q), heads(k[:, :num_content]), heads(v[:, :num_content]),
                                             attn_mask=mask)
        rows = rows + block.ls1(block.attn.proj(out.transpose(1, 2).flatten(2)))
        rows = rows + block.ls2(block.mlp(block.norm2(rows)))
        content, query = rows[:, :num_content], rows[:, num_content:]
    return model.token_head(backbone.norm(query))


@pytest.mark.parametrize("objective", ["mapet", "plm"])
@pytest.mark.parametrize("num_predict", [1, 7, 12, 16])
def test_forward_equals_the_rule_table_spelled_out(objective, num_predict):
    """The rank-ordered layout, plain prefix attention and the last-block shortcut change nothing."""
    model = tiny(objective).eval()
    generator = torch.Generator().manual_seed(num_predict)
    order = sample_orders(objective, 3, GRID, num_predict, generator)
    images = torch.randn(3, 3, 16, 16, generator=generator)
    torch.testing.assert_close(model(images, order, num_predict),
                               reference_two_stream_logits(model, images, order, num_predict), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", ["mapet", "plm"])
def test_nothing_predicted_content_stream_is_plain_backbone(objective):
    model = tiny(objective).eval()
    images = torch.randn(2, 3, 16, 16)
    order = sample_orders(objective, 2, GRID, 0, torch.Generator().manual_seed(0))
    content, query = model.forward_features(images, order, 0)
    assert query.shape == (2, 0, 32)
    torch.testing.assert_close(content, model.backbone.forward_features(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["mapet", "plm"])
def test_forward_matches_full_forward_features(objective):
    """The last block's shortcut (query rows only) changes nothing."""
    model = tiny(objective).eval()
    images = torch.randn(2, 3, 16, 16)
    order = sample_orders(objective, 2, GRID, 9, torch.Generator().manual_seed(0))
    _, query = model.forward_features(images, order, 9)
    torch.testing.assert_close(model(images, order, 9), model.token_head(query))


def test_backbone_is_stock_timm_with_method_defaults():
    model = tiny("mapet", drop_path_rate=0.1)
    backbone = model.backbone
    assert type(backbone) is timm.models.vision_transformer.VisionTransformer
    assert torch.allclose(backbone.blocks[0].ls1.gamma, torch.full((32,), 0.1))
    assert backbone.blocks[0].attn.qkv.bias is not None
    assert backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    own = {name for name, _ in model.named_parameters() if not name.startswith("backbone.")}
    assert own == {"mask_token", "token_head.weight", "token_head.bias"}


def test_exported_backbone_loads_into_timm_with_identical_features():
    model = tiny("mapet").eval()
    vit = timm.create_model(model.backbone_name, **model.timm_kwargs).eval()
    result = vit.load_state_dict(export_backbone(model), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(vit.forward_features(images), model.backbone.forward_features(images))


def test_mapet_export_command_writes_a_timm_loadable_file(tmp_path, capsys):
    model = tiny("plm").eval()
    save_pretrain_model(model, tmp_path / "model.safetensors")
    assert torch.equal(load_pretrain_model(tmp_path / "model.safetensors").mask_token, model.mask_token)
    params = tmp_path / "params.yaml"
    params.write_text(f"pretrain:\n  out_dir: {tmp_path}\n")
    assert main(["export", "--params", str(params)]) == 0
    vit = timm.create_model(model.backbone_name, **model.timm_kwargs).eval()
    timm.models.load_checkpoint(vit, str(tmp_path / "backbone.safetensors"), strict=False)
    images = torch.randn(1, 3, 16, 16)
    assert torch.equal(vit.forward_features(images), model.backbone.forward_features(images))
    with open(tmp_path / "backbone.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert header["__metadata__"]["kind"] == "backbone" and header["__metadata__"]["objective"] == "plm"


def test_mapet_export_bad_input_is_one_clear_message(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"pretrain:\n  out_dir: {tmp_path}\n")
    assert main(["export", "--params", str(params)]) == 2
    assert f"{tmp_path}/model.safetensors: no such file" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"not a model")
    assert main(["export", "--params", str(params)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert main(["export", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: parameters file not found" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["mapet", "plm", "mim"])
def test_bf16_autocast_on_cpu_trains(objective):
    model = tiny(objective).train()
    order = sample_orders(objective, 2, GRID, 6, torch.Generator().manual_seed(0), min_block=2)
    targets = torch.randint(VOCAB, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 16, 16), order, 6)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("objective", ["mapet", "plm", "mim"])
def test_fixed_seed_gives_identical_logits(objective):
    def run():
        model = tiny(objective, drop_path_rate=0.1).train()
        generator = torch.Generator().manual_seed(7)
        order = sample_orders(objective, 2, GRID, 6, generator, min_block=2)
        images = torch.randn(2, 3, 16, 16, generator=generator)
        torch.manual_seed(1)
        return model(images, order, 6)

    assert torch.equal(run(), run())


def test_bad_order_shape_is_refused():
    model = tiny("mapet")
    with pytest.raises(ValueError, match=r"order must have shape \(batch, num_patches\) = \(2, 16\)"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(2, 15, dtype=torch.long), 4)


@pytest.mark.parametrize("command, kind", [(["evaluate", "--model"], "classifier"), (["probe", "--backbone"], "backbone"),
                                           (["pictures", "--model"], "pretrain")])
def test_truncated_or_foreign_safetensors_are_one_message(tmp_path, capsys, command, kind):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(64, 64)}, str(tmp_path / "foreign.safetensors"))      # no mapet description
    whole = (tmp_path / "foreign.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(whole[:len(whole) // 2])
    for name, message in (("truncated", "not a readable safetensors file"),
                          ("foreign", f"holds a 'unlabelled' model, expected a '{kind}' model")):
        path = tmp_path / f"{name}.safetensors"
        assert main([*command, str(path), "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert f"{path}: {message}" in error and "Traceback" not in error
