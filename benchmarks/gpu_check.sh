#!/usr/bin/env bash
# The GPU checks of the open issues, as one script for a machine with one NVIDIA GPU. It runs the
# checks named on its command line (default: step loop profile ceiling compare), always in the
# order below: the step while the CPUs make the loop's data, then the most important first. Each
# result lands in $OUT (default /tmp/gpu_check) as soon as it exists, and a check that fails or
# runs out of time does not stop the next (the lease is short). Numbers go to BENCHMARKS.md with
# the card's name.
#   step:    pretrain_step.json: benchmarks/pretrain_step.py --compile, ViT-B/16 at 224, batch 128,
#            bf16, eager and compiled, interleaved: ViT and STEP_MODELS (default mapet; all of them:
#            mapet,plm,mim,token_head), the compiled step the loop is measured against;
#   head:    token_head.json: the token head and its cross-entropy, whole and chunked, beside the
#            eager MaPeT step;
#   loop:    pretrain_loop_<decode>_zero<stage>.json: `mapet pretrain` (compile auto = on, bf16,
#            torchrun, NCCL) with the paper preset's model at batch 128, one epoch over ImageNet-like
#            JPEG shards made here: ZeRO 0 (the preset's: fused AdamW, one clipping) and ZeRO 1
#            (DeepSpeed's ZeRO optimizer, the loop of before) decoded by nvJPEG (gpu, 4 workers
#            reading), then ZeRO 0 decoded by the loader workers (cpu, 12 of them); the rate includes
#            the loader, the sampler and DeepSpeed;
#   profile: profile_<decode>_zero<stage>.json: benchmarks/profile_loop.py on the same runs: wall time
#            per step, the GPU's busy share, the host operators and kernels that take the most time;
#   ceiling: ceiling_<mode>_<sdpa>.json: the compiled MaPeT and ViT steps under other torch.compile
#            modes and attention kernels (CEILING, default: max-autotune-no-cudagraphs:auto
#            reduce-overhead:auto default:cudnn default:efficient), to see what lifts the step's MFU;
#   loader:  loader.json: the 224-px input path's images/s per CPU core on this machine, and the
#            loader cores one GPU needs at the rate of the loop;
#   compare: compare/results.{json,md}: benchmarks/compare.py --direct on the whole Fashion-MNIST
#            (60,000 training images), COMPARE_EPOCHS (2) epochs of pre-training and as many of
#            fine-tuning, mapet, plm, mim and scratch x seeds 0 1 2, COMPARE_JOBS (4: a seed at a
#            time) runs at once; each stage's time is in the log.
#            Its data and tokens come from .gpu/ (FASHION_MNIST, FM_TOKENS), made beforehand on a
#            CPU machine by `bash benchmarks/gpu_prepare.sh fashion`.
# Where DeepSpeed is not installed, the wheels in .whl/ (`bash benchmarks/gpu_prepare.sh wheels`)
# go to /tmp/site first. Both folders are ignored by git: a device run names them in its carry.
#
#   bash benchmarks/gpu_check.sh                      # every check
#   bash benchmarks/gpu_check.sh head loop compare    # these, in this order
#   BUDGET=540 bash benchmarks/gpu_check.sh step loop profile   # what fits in 9 minutes, in order
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
WORK=$(mktemp -d)
LOG=$OUT/log.txt
CHECKS=${*:-step loop profile ceiling compare}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=src:benchmarks${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)"
  nproc; } 2>&1 | tee "$OUT/gpu.txt"

# check NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output to the log without
# progress bars; the script goes on whatever it returns. BUDGET (seconds, from the script's start)
# shortens the limit to what is left of it and skips a check that would get under 30 s, so that a
# device call's own limit never cuts the script off with results unwritten.
check() {
  local name=$1 limit=$2 started=$SECONDS left=$((${BUDGET:-86400} - SECONDS))
  shift 2
  if [ $left -lt 30 ]; then
    echo "== $name: skipped, $left s of BUDGET left" | tee -a "$LOG"
    return
  fi
  [ $left -lt "$limit" ] && limit=$left
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v "[0-9]s/step\|step/s\|it/s\]\|s/it\]\|batch/s\|img/s\]" | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$LOG"
}
wants() { [[ " $CHECKS " == *" $1 "* ]]; }

# The datasets are made on the CPUs while the first GPU checks run.
if wants loop || wants profile || wants loader; then
  python3 benchmarks/imagenet_like.py --out "$WORK/imagenet" --images ${IMAGES:-10240} --workers 8 > "$WORK/imagenet.log" 2>&1 &
  imagenet_maker=$!
fi
if wants compare; then
  python3 -m mapet params --set 'data.max_per_split={}' --out "$WORK/fm-params.yaml" > /dev/null
  python3 -m mapet data import --params "$WORK/fm-params.yaml" --source "${FASHION_MNIST:-.gpu/fashion-mnist}" \
    --out "$WORK/fm" --workers 4 > "$WORK/fm.log" 2>&1 &
  fashion_maker=$!
fi

if wants step; then
  check pretrain_step 300 sh -c "python3 benchmarks/pretrain_step.py --device cuda --compile --steps 15 --warmup 3 \
    --models ${STEP_MODELS:-mapet} > '$OUT/pretrain_step.json'"
  cat "$OUT/pretrain_step.json" >> "$LOG"
fi

if wants head; then
  check token_head 120 sh -c "python3 benchmarks/pretrain_step.py --device cuda --steps 20 --warmup 3 \
    --models mapet,token_head,token_head_chunked > '$OUT/token_head.json'"
  cat "$OUT/token_head.json" >> "$LOG"
fi

if wants loop || wants profile || wants loader; then
  wait $imagenet_maker; tr '\r' '\n' < "$WORK/imagenet.log" | grep -v "img/s\]" | tee -a "$LOG"
fi
for run in gpu_zero0 gpu_zero1 cpu_zero0; do
  wants loop || wants profile || break
  decode=${run%_zero*} stage=${run#*_zero}
  workers=$([ $decode = gpu ] && echo 4 || echo 12)
  python3 -m mapet params --set preset=paper --set presets.paper.pretrain.epochs=1 \
    --set presets.paper.pretrain.batch_size=128 --set presets.paper.pretrain.micro_batch_size=128 \
    --set presets.paper.pretrain.warmup_epochs=0.5 --set presets.paper.pretrain.workers=$workers \
    --set presets.paper.pretrain.zero_stage=$stage --set pretrain.probe_every=0 --set pretrain.decode=$decode \
    --set presets.paper.pretrain.checkpoint_every=100000 --out "$WORK/params-$run.yaml" | tee -a "$LOG"
  if wants loop; then
    check "pretrain_loop $run" 140 torchrun --standalone --nproc_per_node 1 -m mapet pretrain \
      --params "$WORK/params-$run.yaml" --data "$WORK/imagenet/data" --tokens "$WORK/imagenet/tokens" \
      --out "$WORK/pretrain-$run"
    cp "$WORK/pretrain-$run/metrics.json" "$OUT/pretrain_loop_$run.json" && cat "$OUT/pretrain_loop_$run.json" >> "$LOG"
  fi
  if wants profile && [ $decode = gpu ]; then
    check "profile $run" 120 sh -c "python3 benchmarks/profile_loop.py --wait 12 --active 6 -- \
      --params '$WORK/params-$run.yaml' --data '$WORK/imagenet/data' --tokens '$WORK/imagenet/tokens' \
      --out '$WORK/profile-$run' > '$OUT/profile_$run.json'"
    head -c 600 "$OUT/profile_$run.json" >> "$LOG"
  fi
done

if wants ceiling; then
  for variant in ${CEILING:-max-autotune-no-cudagraphs:auto reduce-overhead:auto default:cudnn default:efficient}; do
    mode=${variant%:*} sdpa=${variant#*:}
    check "ceiling $mode $sdpa" 240 sh -c "python3 benchmarks/pretrain_step.py --device cuda --compile \
      --compile-mode $mode $([ "$sdpa" = auto ] || echo "--sdpa $sdpa") --steps 15 --warmup 3 --models mapet \
      > '$OUT/ceiling_${mode}_$sdpa.json'"
    cat "$OUT/ceiling_${mode}_$sdpa.json" >> "$LOG"
  done
fi

if wants loader; then
  target=$(python3 -c "import json; print(json.load(open('$OUT/pretrain_loop_cpu_zero0.json'))['images_per_s'])" 2>/dev/null \
    || echo 1400)
  check loader 60 sh -c "python3 benchmarks/loader_throughput.py --data '$WORK/imagenet/data' --workers 12 \
    --target $target > '$OUT/loader.json'"
  cat "$OUT/loader.json" >> "$LOG"
fi

if wants compare; then
  wait $fashion_maker; tr '\r' '\n' < "$WORK/fm.log" | grep -v "img/s\]" | tee -a "$LOG"
  mkdir -p "$OUT/compare"
  check compare "${COMPARE_SECONDS:-330}" python3 benchmarks/compare.py --direct "$WORK/compare" --data "$WORK/fm" \
    --tokens "${FM_TOKENS:-.gpu/fm-tokens}" --jobs ${COMPARE_JOBS:-4} --out "$OUT/compare" \
    --set pretrain.max_shards=0 --set pretrain.epochs=${COMPARE_EPOCHS:-2} --set finetune.max_shards=0 \
    --set finetune.epochs=${COMPARE_EPOCHS:-2} --set pretrain.compile=false --set finetune.compile=false
  for log in "$WORK"/compare/*/log.txt; do
    tr '\r' '\n' < "$log" | grep -v "it/s\]\|s/it\]\|img/s\]\|step/s\]\|s/step\]" | tail -5 > "$OUT/compare/$(basename "$(dirname "$log")").log"
  done
fi
