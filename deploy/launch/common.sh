# shellcheck shell=bash
# Shared by start.sh, start_cuda.sh and start_npu.sh (sourced, never run): argument
# parsing, the model-directory and card-count checks, and the `--check` report.
#
# Convention: UPPER_CASE names are environment variables the worker or a library reads
# (tests/deploy checks each against consumer.settings); lower_case names are local.

# --check: run every check, print the resolved environment, start nothing.
check_only=0
worker_args=()

parse_args() {
  local arg
  for arg in "$@"; do
    if [[ $arg == --check ]]; then
      check_only=1
    else
      worker_args+=("$arg")
    fi
  done
}

die() {
  printf '%s: error: %s\n' "${launcher:-i2v launcher}" "$*" >&2
  exit 1
}

# Fill in what the caller left unset (or empty); a value the caller chose always wins.
thread_defaults() {
  local threads=$1
  : "${OMP_NUM_THREADS:=$threads}"
  : "${MKL_NUM_THREADS:=$threads}"
  : "${OPENBLAS_NUM_THREADS:=$threads}"
  export OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS
}

# pydantic reads booleans case-insensitively from 1/true/yes/on/t/y.
is_true() {
  case "${1,,}" in
    1 | true | yes | on | t | y) return 0 ;;
    *) return 1 ;;
  esac
}

# The diffusers layout is what the engine loads; the seed's original Wan checkpoint (no
# transformer/config.json) would fail minutes later inside the ranks, so refuse it here.
check_model_dir() {
  : "${MODEL_CKPT_DIR:=/data/models/modelscope/hub/Wan-AI/Wan2.1-I2V-14B-720P}"
  export MODEL_CKPT_DIR
  if [[ ! -d $MODEL_CKPT_DIR ]]; then
    die "MODEL_CKPT_DIR=$MODEL_CKPT_DIR is not a directory. Point MODEL_CKPT_DIR at a download" \
      "of Wan-AI/Wan2.1-I2V-14B-720P-Diffusers (or mount it there); \`i2v model tiny --out DIR\`" \
      "makes a tiny random-weight one for trials."
  fi
  if [[ ! -f $MODEL_CKPT_DIR/transformer/config.json ]]; then
    die "MODEL_CKPT_DIR=$MODEL_CKPT_DIR has no transformer/config.json: the worker loads the" \
      "diffusers layout (transformer/, vae/, text_encoder/, tokenizer/, image_encoder/," \
      "image_processor/, scheduler/) of Wan-AI/Wan2.1-I2V-14B-720P-Diffusers, not the" \
      "original Wan-AI/Wan2.1-I2V-14B-720P checkpoint."
  fi
}

positive_int() {
  local name=$1 value=$2
  [[ $value =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer; got '$value'."
}

# The number of entries of a CUDA_VISIBLE_DEVICES-style list ("" is none).
count_list() {
  local list=$1 entries
  [[ -z $list ]] && { echo 0; return; }
  IFS=, read -r -a entries <<<"$list"
  echo "${#entries[@]}"
}

# Refuse a node that asks for more ranks than it has cards, before anything loads.
# NPROC unset means cards / LANES, so then only LANES must fit.
check_cards() {
  local cards=$1 what=$2 lanes=${LANES:-1} nproc
  positive_int LANES "$lanes"
  if [[ -n ${NPROC:-} ]]; then
    positive_int NPROC "$NPROC"
    nproc=$NPROC
  else
    nproc=$((cards / lanes))
  fi
  if ((cards == 0)); then
    die "no $what visible. Check the driver (nvidia-smi / npu-smi info) and the visible-devices" \
      "variable; on a machine without accelerators run start.sh with DEVICE=cpu."
  fi
  if ((nproc < 1)); then
    die "LANES=$lanes is more than the $cards ${what}s visible: each lane needs at least one."
  fi
  if ((nproc * lanes > cards)); then
    die "NPROC x LANES = ${nproc} x ${lanes} needs $((nproc * lanes)) ${what}s but $cards" \
      "are visible. Lower NPROC or LANES (NPROC defaults to cards / LANES) or make more" \
      "cards visible."
  fi
  resolved_layout="$cards ${what}s visible; NPROC=$nproc x LANES=$lanes"
}

check_i2v_installed() {
  command -v i2v >/dev/null 2>&1 ||
    die "the i2v command is not on PATH: pip install 'i2v-fleet[worker]' (plus '[npu]' on Ascend)."
}

# The resolved environment of the node: its own settings and the libraries' variables.
# Secrets are masked because this output ends up in logs.
print_environment() {
  local families='MODEL_CKPT_DIR|DEVICE|NPROC|LANES|T5_|DIT_|VAE_|ULYSSES_|CFG_|USE_ATTENTION_'
  families+='|COLLECTIVE_|TASK_|MAX_|LEASE_|HEARTBEAT_|SHUTDOWN_|ENGINE_|NODE_ID|SERVER_|KAFKA_'
  families+='|MINIO_|I2V_|NCCL_|HCCL_|ASCEND_|CUDA_|OMP_|MKL_|OPENBLAS_|TOKENIZERS_|PYTORCH_'
  families+='|CPU_AFFINITY_'
  printf 'launcher: %s\n' "$launcher"
  printf 'device: %s\n' "$DEVICE"
  printf 'cards: %s\n' "${resolved_layout:-the CPU runs any NPROC}"
  printf 'model: %s (transformer/config.json found)\n' "$MODEL_CKPT_DIR"
  printf 'i2v: %s\n' "$(command -v i2v)"
  printf 'environment:\n'
  env | grep -E "^(${families})[A-Z0-9_]*=" |
    sed -E 's/^([A-Z0-9_]*(SECRET|PASSWORD)[A-Z0-9_]*)=.*/\1=***/' | sort | sed 's/^/  /'
}

# Last step of every launcher: report, or become the worker (exec keeps the PID, so
# SIGTERM from systemd, docker or the kubelet reaches the supervisor directly).
run_worker() {
  check_i2v_installed
  if ((check_only)); then
    print_environment
    exit 0
  fi
  exec i2v worker ${worker_args[@]+"${worker_args[@]}"}
}
