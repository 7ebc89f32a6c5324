from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pictures(data: Input[Dataset], params: Input[Artifact], tokens: Input[Dataset], model: Input[Model],
             report: Output[HTML]):
    """`mapet pictures`: what the pre-trained model predicts for a few images at one prediction
    order, and the codebook's most used codes with image patches assigned to each, as one page."""
    import shutil
    import tempfile
    from pathlib import Path

    from components.runtime import mapet

    out = Path(tempfile.mkdtemp())
    mapet("pictures", "--params", params.path, "--data", data.metadata["path"], "--tokens", tokens.path,
          "--model", model.path, "--out", out)
    shutil.copy(out / "index.html", report.path)
