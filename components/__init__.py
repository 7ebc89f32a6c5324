"""Kubeflow Pipelines (kfp v2) components, one folder per step. Each is a lightweight Python
component on the project's image (components/Dockerfile) that runs a `mapet` command; the code
they share at run time lives in `components.runtime`."""

import os

# The image every component and the TrainJob run. Build and push it (`make image IMAGE=...`), then
# compile the pipeline with MAPET_IMAGE set to it; the committed YAML uses this default.
IMAGE = os.environ.get("MAPET_IMAGE", "ghcr.io/mapet-project/mapet:0.1.0")
