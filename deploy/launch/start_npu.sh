#!/usr/bin/env bash
# Start an i2v worker node on Huawei Ascend NPUs: load the CANN toolkit environment, fill
# in the HCCL/ASCEND/torch_npu and thread defaults the caller left unset, check the model
# directory and that NPROC x LANES fits the visible NPUs, then exec `i2v worker`.
#
# Usage: deploy/launch/start_npu.sh [--check] [i2v worker args...]
#   --check   run every check and print the resolved environment; start nothing.
# Every setting comes from the environment (consumer/settings.py, README "The worker node"):
#   MODEL_CKPT_DIR=/models/Wan2.1-I2V-14B-720P-Diffusers KAFKA_BOOTSTRAP_SERVERS=kafka:9092 \
#   MINIO_ENDPOINT=minio:9000 MINIO_ACCESS_KEY=... MINIO_SECRET_KEY=... start_npu.sh
set -euo pipefail

launcher=start_npu.sh
here=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
# shellcheck source=deploy/launch/common.sh
source "$here/common.sh"
parse_args "$@"

: "${DEVICE:=npu}"
[[ $DEVICE == npu ]] || die "DEVICE=$DEVICE but this launcher is for npu; use start.sh to detect."
export DEVICE

# torch_npu needs the CANN libraries on the library path; images and hosts that already
# set it up are unaffected (the script only adds what is missing). It reads unset
# variables, so -u is off while it runs.
toolkit_env=/usr/local/Ascend/ascend-toolkit/set_env.sh
if [[ -f $toolkit_env ]]; then
  set +u
  # shellcheck source=/dev/null
  source "$toolkit_env"
  set -u
fi

# The seed's defaults, with its "T5 on CPU" column when T5_CPU is true (the CPU encoder
# makes rank 0 slower to reach the first collective, and leaves less host memory).
# HCCL_TIMEOUT is the library's own backstop; the engine gives up on a collective after
# COLLECTIVE_TIMEOUT_S (600 s), restarts itself and hands the job back.
if is_true "${T5_CPU:-false}"; then
  : "${HCCL_TIMEOUT:=2400}" "${HCCL_CONNECT_TIMEOUT:=900}" "${HCCL_BUFFSIZE:=256}"
  thread_defaults 16
else
  : "${HCCL_TIMEOUT:=1800}" "${HCCL_CONNECT_TIMEOUT:=600}" "${HCCL_BUFFSIZE:=512}"
  thread_defaults 8
fi
: "${PYTORCH_NPU_ALLOC_CONF:=expandable_segments:True}" # less fragmentation across jobs
: "${TASK_QUEUE_ENABLE:=2}"
: "${CPU_AFFINITY_CONF:=1}"
: "${ASCEND_LAUNCH_BLOCKING:=0}"
: "${ASCEND_GLOBAL_LOG_LEVEL:=1}"
: "${TOKENIZERS_PARALLELISM:=false}"
export HCCL_TIMEOUT HCCL_CONNECT_TIMEOUT HCCL_BUFFSIZE PYTORCH_NPU_ALLOC_CONF TASK_QUEUE_ENABLE
export CPU_AFFINITY_CONF ASCEND_LAUNCH_BLOCKING ASCEND_GLOBAL_LOG_LEVEL TOKENIZERS_PARALLELISM

check_model_dir

# Cards: the /dev/davinciN device nodes (a container holds only its own), else npu-smi's
# count, narrowed by ASCEND_RT_VISIBLE_DEVICES when the caller set it; unset, it becomes all
# of them (the seed's 0,...,7 on an 8-card node).
physical=""
shopt -s nullglob
davinci=(/dev/davinci[0-9]*)
shopt -u nullglob
if ((${#davinci[@]} > 0)); then
  physical=${#davinci[@]}
elif command -v npu-smi >/dev/null 2>&1 && listing=$(npu-smi info -l 2>/dev/null); then
  physical=$(sed -nE 's/^[[:space:]]*Total Count[[:space:]]*:[[:space:]]*([0-9]+).*/\1/p' \
    <<<"$listing" | head -n 1)
fi
if [[ -n ${ASCEND_RT_VISIBLE_DEVICES+set} ]]; then
  cards=$(count_list "$ASCEND_RT_VISIBLE_DEVICES")
  if [[ -n $physical ]] && ((physical < cards)); then cards=$physical; fi
elif [[ -n $physical ]]; then
  cards=$physical
  if ((cards > 0)); then
    ASCEND_RT_VISIBLE_DEVICES=$(seq -s, 0 $((cards - 1)))
    export ASCEND_RT_VISIBLE_DEVICES
  fi
else
  die "no Ascend NPU found: no /dev/davinci* device, npu-smi is missing or fails, and" \
    "ASCEND_RT_VISIBLE_DEVICES is unset. Check the driver and the container runtime" \
    "(ascend-docker-runtime), or run start.sh with DEVICE=cpu."
fi
check_cards "$cards" NPU

run_worker
