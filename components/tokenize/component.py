from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tokenize(data: Input[Dataset], params: Input[Artifact], codebook: Input[Model], tokens: Output[Dataset],
             report: Output[Markdown], health: Output[Metrics]):
    """`mapet tokenize`: the nearest code of every patch of every image, plus the codebook's health."""
    import shutil
    from pathlib import Path

    from components.runtime import log_json_metrics, mapet

    out = Path(tokens.path)
    mapet("tokenize", "--params", params.path, "--data", data.metadata["path"], "--codebook", codebook.path,
          "--out", out)
    shutil.copy(out / "codebook.md", report.path)
    log_json_metrics(health, out / "health.json")
    tokens.metadata.update({"k": codebook.metadata.get("k"), "data_md5": data.metadata.get("data_md5")})
