"""Training curves of a run's history.json (loss, learning rate, and the k-NN monitor where it
ran) as a PNG and a self-contained HTML page: what DVC's plots show on a workstation, for the
Kubeflow UI."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mapet.engine.evaluate import save_figure, write_html  # noqa: E402
from mapet.errors import MapetError  # noqa: E402


def write_curves(history_file: Path, out: Path, title: str) -> Path:
    """out/curves.png and out/index.html from ``history_file`` (one record per optimizer step:
    ``step``, ``loss``, ``lr``, optionally ``token_accuracy`` and ``knn_top1``, null between
    probes); returns the page's path."""
    history_file, out = Path(history_file), Path(out)
    try:
        history = json.loads(history_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MapetError(f"{history_file}: not a training history ({error})") from error
    if not history or not all("step" in record and "loss" in record for record in history):
        raise MapetError(f"{history_file}: not a training history (records with step and loss)")
    steps = [record["step"] for record in history]
    panels = [("loss", "training loss"), ("lr", "learning rate")]
    if any(record.get("token_accuracy") is not None for record in history):
        panels.insert(1, ("token_accuracy", "token accuracy"))
    if any(record.get("knn_top1") is not None for record in history):
        panels.append(("knn_top1", "k-NN top-1 (monitor)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for axis, (key, label) in zip(axes, panels):
        points = [(step, record[key]) for step, record in zip(steps, history) if record.get(key) is not None]
        axis.plot(*zip(*points), marker="o" if key == "knn_top1" else None, markersize=4, linewidth=1.2)
        axis.set_xlabel("optimizer step")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    save_figure(figure, out / "curves.png")
    last = history[-1]
    caption = f"{title}: {len(history)} steps, final loss {last['loss']}" + (
        f", k-NN top-1 {last['knn_top1']}" if last.get("knn_top1") is not None else "")
    write_html(out, title, {"curves.png": caption})
    return out / "index.html"
