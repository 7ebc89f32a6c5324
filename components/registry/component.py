from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_registry(fingerprint: str, registry_url: str, registry_model: str, workspace: str, force: bool,
                   report: Output[Markdown]) -> str:
    """Looks the run's `fingerprint` up in the model registry (Kubeflow Model Registry at
    `registry_url`, or the workspace's): "skip" when a model of it is registered and `force` is
    off, else "train"; the reason in `report`."""
    from pathlib import Path

    from mapet.registry import open_registry
    from mapet.registry.fingerprint import skip_decision

    skip, reason = skip_decision(open_registry(registry_url, Path(workspace), registry_model), fingerprint, force)
    Path(report.path).write_text(reason)
    print(reason)
    return "skip" if skip else "train"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promotion_gate(data: Input[Dataset], params: Input[Artifact], evaluate_metrics: Input[Metrics],
                   classifier: Input[Model], backbone: Input[Model], registry_url: str, registry_model: str,
                   workspace: str, run_id: str, decision: Output[Markdown], metrics: Output[Metrics]):
    """Registers the evaluated classifier, then promotes it to pipeline.promotion.stage when its test
    top-1 beats the champion's by pipeline.promotion.min_delta (the first model is promoted)."""
    from pathlib import Path

    from components.registry.gate import run_gate
    from mapet.registry.gate import decision_markdown

    outcome = run_gate(dict(data.metadata), Path(params.path), dict(evaluate_metrics.metadata), Path(classifier.path),
                       classifier.uri, Path(backbone.path), backbone.uri, registry_url, registry_model,
                       Path(workspace), run_id)
    Path(decision.path).write_text(decision_markdown(outcome))
    print(decision_markdown(outcome))
    metrics.log_metric("promoted", float(outcome.promoted))
    metrics.log_metric("candidate_top1", outcome.candidate_top1)
    metrics.log_metric("min_delta", outcome.min_delta)
    if outcome.champion_top1 is not None:
        metrics.log_metric("champion_top1", outcome.champion_top1)
        metrics.log_metric("margin", outcome.candidate_top1 - outcome.champion_top1)
