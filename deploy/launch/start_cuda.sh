#!/usr/bin/env bash
# Start an i2v worker node on NVIDIA GPUs: fill in the NCCL/CUDA and thread defaults the
# caller left unset, check the model directory and that NPROC x LANES fits the visible
# GPUs, then exec `i2v worker`.
#
# Usage: deploy/launch/start_cuda.sh [--check] [i2v worker args...]
#   --check   run every check and print the resolved environment; start nothing.
# Every setting comes from the environment (consumer/settings.py, README "The worker node"):
#   MODEL_CKPT_DIR=/models/Wan2.1-I2V-14B-720P-Diffusers KAFKA_BOOTSTRAP_SERVERS=kafka:9092 \
#   MINIO_ENDPOINT=minio:9000 MINIO_ACCESS_KEY=... MINIO_SECRET_KEY=... start_cuda.sh
set -euo pipefail

launcher=start_cuda.sh
here=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
# shellcheck source=deploy/launch/common.sh
source "$here/common.sh"
parse_args "$@"

: "${DEVICE:=cuda}"
[[ $DEVICE == cuda ]] || die "DEVICE=$DEVICE but this launcher is for cuda; use start.sh to detect."
export DEVICE

# The seed's defaults. NCCL_TIMEOUT is the library's own backstop; the engine gives up on a
# collective after COLLECTIVE_TIMEOUT_S (600 s), restarts itself and hands the job back.
# NCCL_DEBUG=INFO logs only at communicator creation, which happens once per engine start.
: "${NCCL_TIMEOUT:=3600}"
: "${NCCL_DEBUG:=INFO}"
: "${NCCL_IB_DISABLE:=1}" # one node: all traffic is NVLink/PCIe, InfiniBand is not used
: "${NCCL_P2P_DISABLE:=0}"
: "${CUDA_LAUNCH_BLOCKING:=0}"
: "${TOKENIZERS_PARALLELISM:=false}" # the tokenizer runs before the ranks fork threads
export NCCL_TIMEOUT NCCL_DEBUG NCCL_IB_DISABLE NCCL_P2P_DISABLE CUDA_LAUNCH_BLOCKING
export TOKENIZERS_PARALLELISM
# T5 on the CPU does the prompt encoding with these threads, so it gets twice as many.
if is_true "${T5_CPU:-false}"; then thread_defaults 16; else thread_defaults 8; fi

check_model_dir

# Cards: those nvidia-smi lists (a container sees only its own), narrowed by
# CUDA_VISIBLE_DEVICES when the caller set it; unset, it becomes all of them (the seed's
# 0,...,7 on an 8-card node).
physical=""
if command -v nvidia-smi >/dev/null 2>&1 && listing=$(nvidia-smi -L 2>/dev/null); then
  physical=$(grep -c '^GPU ' <<<"$listing" || true)
fi
if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
  cards=$(count_list "$CUDA_VISIBLE_DEVICES")
  if [[ -n $physical ]] && ((physical < cards)); then cards=$physical; fi
elif [[ -n $physical ]]; then
  cards=$physical
  if ((cards > 0)); then
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((cards - 1)))
    export CUDA_VISIBLE_DEVICES
  fi
else
  die "no NVIDIA GPU found: nvidia-smi is missing or fails and CUDA_VISIBLE_DEVICES is unset." \
    "Check the driver and the container runtime (--gpus all), or run start.sh with DEVICE=cpu."
fi
check_cards "$cards" GPU

run_worker
