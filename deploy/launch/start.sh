#!/usr/bin/env bash
# Start an i2v worker node on whatever this machine has: NVIDIA GPUs (a working
# nvidia-smi) → start_cuda.sh, Ascend NPUs (npu-smi or /dev/davinci*) → start_npu.sh,
# otherwise the CPU (tests and demos). DEVICE=cuda|npu|cpu skips the detection.
#
# Usage: deploy/launch/start.sh [--check] [i2v worker args...]
#   --check   run every check and print the resolved environment; start nothing.
# The entry point of the systemd unit; the images call their own launcher directly.
set -euo pipefail

launcher=start.sh
here=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
# shellcheck source=deploy/launch/common.sh
source "$here/common.sh"

if [[ -z ${DEVICE:-} ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DEVICE=cuda
  elif command -v npu-smi >/dev/null 2>&1 || compgen -G '/dev/davinci[0-9]*' >/dev/null; then
    DEVICE=npu
  else
    DEVICE=cpu
  fi
fi
# Exported so the worker uses the device detected here rather than detecting again.
export DEVICE

case "$DEVICE" in
  cuda) exec "$here/start_cuda.sh" "$@" ;;
  npu) exec "$here/start_npu.sh" "$@" ;;
  cpu) ;;
  *) die "DEVICE must be cuda, npu or cpu; got '$DEVICE'." ;;
esac

# The CPU: no cards to count (it runs any NPROC) and no thread defaults, since here the
# threads do the compute and torch's own default (every core) is right.
parse_args "$@"
: "${TOKENIZERS_PARALLELISM:=false}"
export TOKENIZERS_PARALLELISM
check_model_dir
run_worker
