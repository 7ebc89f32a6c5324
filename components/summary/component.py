from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def summarize(data: Input[Dataset], params: Input[Artifact], pretrain_metrics: Input[Metrics],
              probe_metrics: Input[Metrics], scratch_metrics: Input[Metrics], finetune_metrics: Input[Metrics],
              evaluate_metrics: Input[Metrics], decision: Input[Markdown], summary: Output[Markdown]):
    """The run on one page: repository, commit, data version, fingerprint, the parameters this run
    changed, the main numbers of every step, and the promotion gate's decision."""
    from pathlib import Path

    from components.summary.summary import run_summary

    steps = {"pre-training": pretrain_metrics.metadata, "probe, pre-trained backbone": probe_metrics.metadata,
             "probe, random initialisation": scratch_metrics.metadata, "fine-tuning": finetune_metrics.metadata,
             "evaluation": evaluate_metrics.metadata}
    text = run_summary(dict(data.metadata), list(params.metadata.get("overrides", [])), steps,
                       Path(decision.path).read_text())
    Path(summary.path).write_text(text)
