"""ZeRO 0, the loop whose work outside the model does not grow with the parameter tensors: torch's
fused AdamW, clipping by the global norm in a few operators, bf16 as autocast over fp32 weights;
it trains as DeepSpeed's ZeRO 1 optimizer does, on one process and two, and resumes exactly."""

import pytest
import torch

from mapet.engine.deepspeed_engine import deepspeed_config
from mapet.engine.optim import clip_by_global_norm
from test_pretrain import finish, history, launch, tokens, weights, write_params  # noqa: F401 (fixture)


def test_zero_0_turns_deepspeeds_clipping_and_bf16_optimizer_off_and_autocasts():
    config = deepspeed_config(8, 2, 3.0, 0, True)
    assert config["gradient_clipping"] == 0.0                  # DeepSpeed's default would clip at 1.0
    assert "bf16" not in config
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    zero1 = deepspeed_config(8, 2, 3.0, 1, True)
    assert zero1["gradient_clipping"] == 3.0 and zero1["bf16"]["enabled"] and "torch_autocast" not in zero1


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_scales_as_torch_does(max_norm):
    generator = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((7, 3), (5,), (2, 2, 2))]
    theirs = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((7, 3), (5,), (2, 2, 2))]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=generator)
        b.grad = a.grad.clone()
    untouched = [p.grad.clone() for p in ours]
    without_grad = torch.nn.Parameter(torch.zeros(3))
    clip_by_global_norm([*ours, without_grad], max_norm)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    for a, b, before in zip(ours, theirs, untouched):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        assert torch.equal(a.grad, before) == (max_norm == 100.0)      # the norm is about 4.5
    assert without_grad.grad is None


@pytest.mark.slow
def test_zero_0_trains_as_zero_1_on_one_process_and_on_two(tokens, tmp_path):
    data, token_dir = tokens
    # grad_clip 0.05: a threshold the gradients of a fresh model exceed, so that the steps clip
    runs = {"zero1": ({"zero_stage": 1, "workers": 2}, 1), "zero0": ({"zero_stage": 0, "workers": 2}, 1),
            "zero0-two-ranks": ({"zero_stage": 0, "workers": 1}, 2),
            "zero0-unclipped": ({"zero_stage": 0, "workers": 2, "grad_clip": 0.0}, 1)}
    for name, (settings, processes) in runs.items():
        (tmp_path / name).mkdir()
        finish(launch(write_params(tmp_path / name, data, token_dir, **{"grad_clip": 0.05, **settings}), processes))
    unclipped = [step["loss"] for step in history(tmp_path / "zero0-unclipped")]
    assert unclipped != pytest.approx([step["loss"] for step in history(tmp_path / "zero0")], abs=1e-3)  # it clipped
    reference = history(tmp_path / "zero1")
    assert len(reference) == 8 and reference[-1]["loss"] < reference[0]["loss"]
    for name in ("zero0", "zero0-two-ranks"):
        for a, b in zip(reference, history(tmp_path / name), strict=True):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["lr"] == pytest.approx(a["lr"])
        for key, tensor in weights(tmp_path / "zero1").items():
            torch.testing.assert_close(weights(tmp_path / name)[key], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_zero_0_bf16_is_autocast_over_fp32_weights_and_keeps_to_zero_1s_losses(tokens, tmp_path):
    data, token_dir = tokens
    for name, stage, bf16 in (("zero1", 1, True), ("zero0", 0, True), ("zero0-fp32", 0, False)):
        (tmp_path / name).mkdir()
        finish(launch(write_params(tmp_path / name, data, token_dir, zero_stage=stage, bf16=bf16)))
    for a, b in zip(history(tmp_path / "zero1"), history(tmp_path / "zero0"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)              # bf16's rounding, not another model
    fp32_losses = [step["loss"] for step in history(tmp_path / "zero0-fp32")]
    assert fp32_losses != pytest.approx([step["loss"] for step in history(tmp_path / "zero0")], abs=1e-5)  # autocast ran
    exported = weights(tmp_path / "zero0")
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in exported.values())   # fp32 weights, not bf16
