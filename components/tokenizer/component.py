from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def build_tokenizer(data: Input[Dataset], params: Input[Artifact], codebook: Output[Model]):
    """`mapet tokenizer build`: patch features of the training split -> k-means codebook (k-CLIP)."""
    import shutil
    import tempfile
    from pathlib import Path

    from components.runtime import mapet
    from mapet.tokenizers.codebook import load_codebook

    out = Path(tempfile.mkdtemp())
    mapet("tokenizer", "build", "--params", params.path, "--data", data.metadata["path"], "--out", out)
    shutil.copy(out / "codebook.safetensors", codebook.path)
    built = load_codebook(Path(codebook.path))
    codebook.metadata.update({"k": built.k, "encoder": built.metadata["encoder"]["name"],
                              "clip": built.metadata["encoder"]["clip"]})
