#!/usr/bin/env bash
# The GPU checks, as one script for a machine with one NVIDIA GPU (results go to BENCHMARKS.md):
#   1. benchmarks/pretrain_step.py on CUDA: ViT-B/16 at 224, batch 128, bf16 (MaPeT/PLM/MIM vs ViT);
#   2. the demo's pretrain -> finetune -> evaluate on the GPU: torchrun, NCCL, DeepSpeed ZeRO-1, bf16,
#      over all 12,000 demo training images.
# Needs data/ and outputs/tokens/ from `make demo`. Where the mapet environment is not installed,
# wheels in .whl/ are installed into /tmp/site first. Results land in $OUT (default /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail   # a failing step stops the script (pipefail: also inside a pipe)
OUT=${OUT:-/tmp/gpu_check}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"

python3 benchmarks/pretrain_step.py --device cuda --steps 20 --warmup 5 | tee "$OUT/pretrain_step_cuda.json"

python3 -m mapet params --set pretrain.max_shards=0 --set pretrain.epochs=2 --set pretrain.batch_size=256 \
  --set pretrain.micro_batch_size=256 --set pretrain.warmup_epochs=0.2 --set pretrain.workers=4 \
  --set finetune.workers=2 --out "$WORK/params.yaml"
for objective in mapet mim; do
  torchrun --standalone --nproc_per_node 1 -m mapet pretrain --params "$WORK/params.yaml" --objective $objective \
    --out "$WORK/pretrain-$objective" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|step/s\]\|s/step\]"
  cp "$WORK/pretrain-$objective/metrics.json" "$OUT/pretrain_$objective.json"
done
torchrun --standalone --nproc_per_node 1 -m mapet finetune --params "$WORK/params.yaml" \
  --backbone "$WORK/pretrain-mapet/backbone.safetensors" --out "$WORK/finetune" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|step/s\]\|s/step\]"
cp "$WORK/finetune/metrics.json" "$OUT/finetune.json"
python3 -m mapet evaluate --params "$WORK/params.yaml" --model "$WORK/finetune/model.safetensors" \
  --out "$WORK/evaluate" 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|batch/s\]\|s/batch\]"
cp "$WORK/evaluate/metrics.json" "$OUT/evaluate.json"
