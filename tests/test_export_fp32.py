"""Under bf16 the exported weights are DeepSpeed's fp32 master weights, not the bf16 module copies."""

import pytest
import torch
from safetensors.torch import load_file

from test_pretrain import finish, launch, tokens, write_params  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_bf16_run_exports_the_optimizer_fp32_masters(tokens, tmp_path, zero_stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    data, token_dir = tokens
    # two ranks, so that each holds half of the masters and the export must gather them
    finish(launch(write_params(tmp_path, data, token_dir, bf16=True, zero_stage=zero_stage, epochs=1, workers=1),
                  processes=2))
    out = tmp_path / "out"
    masters = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(masters)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, masters[name].float()), name
    # bf16 copies would all survive a round trip through bf16
    assert any(not torch.equal(t, t.bfloat16().float()) for t in exported.values())
    backbone = load_file(str(out / "backbone.safetensors"))
    assert backbone and all(torch.equal(t, exported["backbone." + name]) for name, t in backbone.items())
