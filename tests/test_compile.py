"""torch.compile: the compiled model computes what the eager one does, compiles once, and a
compiled `mapet pretrain` writes and resumes the same checkpoints as an eager one."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from mapet.masking import sample_orders
from mapet.models import create_pretrain_model
from test_pretrain import finish, history, launch, tokens, weights, write_params  # noqa: F401 (fixture)

TINY = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.0)
VOCAB = 11
TOLERANCE = 1e-3


def loss_and_grads(model, images, order, num_predict, targets):
    model.zero_grad(set_to_none=True)
    logits = model(images, order, num_predict)
    F.cross_entropy(logits.flatten(0, 1), targets).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("objective", ["mapet", "plm", "mim"])
def test_compiled_model_gives_the_eager_logits_and_gradients_without_recompiling(objective):
    torch.manual_seed(0)
    model = create_pretrain_model(objective, "vit_tiny_patch16_224", VOCAB, **TINY)
    generator = torch.Generator().manual_seed(1)
    num_predict = 6
    batches = [(torch.randn(3, 3, 16, 16, generator=generator),
                sample_orders(objective, 3, (4, 4), num_predict, generator, min_block=2),
                torch.randint(VOCAB, (3 * num_predict,), generator=generator)) for _ in range(3)]
    eager = [loss_and_grads(model, *batch[:2], num_predict, batch[2]) for batch in batches]

    torch._dynamo.reset()
    counters.clear()
    model.compile()
    for step, (batch, (eager_logits, eager_grads)) in enumerate(zip(batches, eager)):
        logits, grads = loss_and_grads(model, *batch[:2], num_predict, batch[2])
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
        # fp32 on both paths; inductor reorders sums and fuses, so agreement is to rounding, not bits
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert graphs >= 1
    assert counters["stats"]["unique_graphs"] == graphs, "new orders and images made torch.compile recompile"
    assert not any(name.startswith("_orig_mod") for name in model.state_dict())


def rewind(run: Path, to: Path, step: int) -> None:
    """A copy of a finished run's folder as it stood after its checkpoint at ``step``."""
    shutil.copytree(run, to)
    (to / "out" / "model.safetensors").unlink()
    (to / "out" / "checkpoints" / "latest").write_text(f"step{step:08d}")


@pytest.mark.parametrize("first", ["eager", "compiled"])
def test_compiled_and_eager_runs_resume_each_other(tokens, tmp_path, first):
    """8 steps in one go, and the same run resumed at step 4 the other way (compiled or eager):
    the same key set, history and weights (to rounding: inductor fuses and reorders fp32 sums)."""
    data, token_dir = tokens
    settings = {"epochs": 2, "workers": 1, "checkpoint_every": 4}
    whole = tmp_path / "whole"
    whole.mkdir()
    output = finish(launch(write_params(whole, data, token_dir, compile=first == "compiled", **settings)))
    assert "more graph(s)" not in output
    resumed = tmp_path / "resumed"
    rewind(whole, resumed, 4)
    params = write_params(resumed, data, token_dir, compile=first == "eager", **settings)
    output = finish(launch(params, resume=True))
    assert "resuming at step 4" in output and "more graph(s)" not in output
    assert len(history(resumed)) == len(history(whole)) == 8
    for mine, theirs in zip(history(resumed), history(whole)):
        assert mine["step"] == theirs["step"] and mine["lr"] == pytest.approx(theirs["lr"], rel=1e-6)
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=TOLERANCE)
    assert set(weights(resumed)) == set(weights(whole))
    for name, tensor in weights(whole).items():
        torch.testing.assert_close(weights(resumed)[name], tensor, rtol=0, atol=TOLERANCE, msg=name)
