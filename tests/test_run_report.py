"""What the Kubeflow UI shows of a run: training curves as a self-contained HTML page, and the run
summary in Markdown."""

import base64
import io
import json
import re

import pytest
from PIL import Image

from components.summary.summary import run_summary
from mapet.engine.curves import write_curves
from mapet.errors import MapetError


def history(steps: int, monitor: bool) -> list[dict]:
    return [{"step": step, "epoch": 0, "loss": 9.0 - step / 10, "token_accuracy": step / 100, "lr": 1e-3 * min(1, step / 5),
             "knn_top1": (0.2 + step / 100 if step % 4 == 0 else None) if monitor else None}
            for step in range(1, steps + 1)]


@pytest.mark.parametrize("monitor, panels", [(True, 4), (False, 3)])
def test_curves_page_embeds_one_png_with_a_panel_per_curve(tmp_path, monitor, panels):
    (tmp_path / "history.json").write_text(json.dumps(history(12, monitor)))
    page = write_curves(tmp_path / "history.json", tmp_path / "out", "pre-training (mapet)").read_text()
    [encoded] = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.width / image.height == pytest.approx(4.2 * panels / 3.4, rel=0.02)     # one panel per curve
    assert "<title>pre-training (mapet)</title>" in page and "12 steps, final loss 7.8" in page
    assert ("k-NN top-1 0.32" in page) == monitor


def test_a_file_that_is_no_history_is_refused(tmp_path):
    (tmp_path / "history.json").write_text(json.dumps([{"epoch": 1}]))
    with pytest.raises(MapetError, match="history.json: not a training history"):
        write_curves(tmp_path / "history.json", tmp_path / "out", "x")


def test_run_summary_names_the_versions_the_changes_and_the_numbers():
    text = run_summary({"repo_url": "https://git.example.com/ml/mapet.git", "git_commit": "a" * 40, "data_md5": "b" * 32,
                        "fingerprint": "c" * 64},
                       ["pretrain.objective=mim", "preset=paper"],
                       {"pre-training": {"loss": 2.94221, "steps": 93.0, "images_per_s": 61.7, "other": 1.0},
                        "probe, pre-trained backbone": {"linear_top1": 0.87, "pixels_linear_top1": 0.82451},
                        "evaluation": {"top1": 0.7585, "top5": 0.986, "images": 2000.0}},
                       "# Promotion to 'prod': **promoted**\n\n| | |\n")
    assert f"| commit | `{'a' * 40}` |" in text and f"| data version (data.dvc md5) | `{'b' * 32}` |" in text
    assert f"| fingerprint (data, parameters, code) | `{'c' * 16}` |" in text
    assert text.endswith("\n\n## Promotion to 'prod': **promoted**\n\n| | |\n")       # the gate, one level down
    assert "| parameters changed for this run | `pretrain.objective=mim`, `preset=paper` |" in text
    assert "| pre-training | loss | 2.9422 |" in text and "| evaluation | top1 | 0.7585 |" in text
    assert "| probe, pre-trained backbone | pixels_linear_top1 | 0.8245 |" in text
    assert "| pre-training | steps | 93 |" in text and "other" not in text and "fine-tuning" not in text
    assert "none: the repository's params.yaml as it is" in run_summary({}, [], {}, "")
