#!/usr/bin/env bash
# The GPU checks of the open issues, as one script for a machine with one NVIDIA GPU, the most
# important first. Each result lands in $OUT (default /tmp/gpu_check) as soon as it exists, and a
# check that fails or runs out of time does not stop the next (the lease is short). Numbers go to
# BENCHMARKS.md with the card's name.
#   1. pretrain_step.json: benchmarks/pretrain_step.py --compile, ViT-B/16 at 224, batch 128, bf16:
#      ViT, MaPeT, PLM, MIM and the token head alone, eager and compiled, interleaved;
#   2. pretrain_loop.json: `mapet pretrain` (compile auto = on, DeepSpeed ZeRO-1, bf16, torchrun,
#      NCCL) with the paper preset's model at batch 128 on ImageNet-like JPEG shards made here, so
#      the rate includes the loader, the sampler and DeepSpeed;
#   3. loader.json: the 224-px input path's images/s per CPU core on this machine, and the loader
#      cores one GPU needs at the rate of 2.
# Where DeepSpeed is not installed, the wheels in .whl/ go to /tmp/site first: deepspeed (built here
# with `pip wheel --no-deps deepspeed==0.19.8`), timm, faiss-cpu, hjson and pydantic with its
# dependencies, at the versions of requirements.lock. STEP_MODELS limits check 1 to some models.
#
#   bash benchmarks/gpu_check.sh
#   STEP_MODELS=vit,mapet,plm bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
WORK=$(mktemp -d)
LOG=$OUT/log.txt
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=src:benchmarks${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)"
  nproc; } 2>&1 | tee "$OUT/gpu.txt"

# check NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output to the log without
# progress bars; the script goes on whatever it returns.
check() {
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v "[0-9]s/step\|step/s\|it/s\]\|s/it\]\|batch/s" | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$LOG"
}

# The dataset of check 2 is made on the CPUs while check 1 runs on the GPU.
python3 benchmarks/imagenet_like.py --out "$WORK/imagenet" --images 7680 --workers 8 > "$WORK/imagenet.log" 2>&1 &
maker=$!

check pretrain_step 300 sh -c "python3 benchmarks/pretrain_step.py --device cuda --compile --steps 15 --warmup 3 \
  --models ${STEP_MODELS:-vit,mapet,plm,mim,token_head} > '$OUT/pretrain_step.json'"
cat "$OUT/pretrain_step.json" >> "$LOG"

wait $maker; cat "$WORK/imagenet.log" | tee -a "$LOG"
python3 -m mapet params --set preset=paper --set presets.paper.pretrain.epochs=2 \
  --set presets.paper.pretrain.batch_size=128 --set presets.paper.pretrain.micro_batch_size=128 \
  --set presets.paper.pretrain.warmup_epochs=0.5 --set presets.paper.pretrain.workers=12 \
  --set presets.paper.pretrain.checkpoint_every=100000 --out "$WORK/params.yaml" | tee -a "$LOG"
check pretrain_loop 170 torchrun --standalone --nproc_per_node 1 -m mapet pretrain --params "$WORK/params.yaml" \
  --data "$WORK/imagenet/data" --tokens "$WORK/imagenet/tokens" --out "$WORK/pretrain"
cp "$WORK/pretrain/metrics.json" "$OUT/pretrain_loop.json" && cat "$OUT/pretrain_loop.json" >> "$LOG"

target=$(python3 -c "import json; print(json.load(open('$OUT/pretrain_loop.json'))['images_per_s'])" 2>/dev/null \
  || python3 -c "import json; print(json.load(open('$OUT/pretrain_step.json'))['images_per_s']['mapet+compile'])")
check loader 60 sh -c "python3 benchmarks/loader_throughput.py --data '$WORK/imagenet/data' --workers 12 \
  --target $target > '$OUT/loader.json'"
cat "$OUT/loader.json" >> "$LOG"
