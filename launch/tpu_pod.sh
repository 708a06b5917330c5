#!/usr/bin/env bash
# Runs `python -m iat_jax.main` on every worker of a Cloud TPU VM slice.
#
#   PROJECT=my-project ZONE=us-central2-b TPU_NAME=iat-v4-32 \
#   BUCKET=gs://my-bucket COMPILE_TARGET=tpu:v4:2x2x4 bash launch/tpu_pod.sh \
#       [--dry_run] [--create] [--setup] [--skip_compile_check] \
#       [-- <extra iat_jax.main flags, e.g. --config.num_epochs=2>]
#
# First, on this machine, every stage of the run's config (the same flags) is
# compiled for the slice (`--mode=compile`, needs the `tpu` extra here, no
# TPU): a config that does not fit the slice's HBM stops the launch before a
# slice is created or a worker touched (the report lands in CHECK_DIR).
#
# Every worker runs the same command with --config.distributed=True;
# jax.distributed.initialize() finds the slice's coordinator and process ids
# itself. The workdir must be shared by all workers (process 0 builds the
# dataset, the others read it; checkpoints are written by all), and iat_jax
# reads and writes it with plain file I/O, so BUCKET is mounted with Cloud
# Storage FUSE (gcsfuse) at MOUNT on every worker and the run writes to
# MOUNT/RUN_NAME, i.e. BUCKET/RUN_NAME.
#
# Variables (environment):
#   PROJECT, ZONE, TPU_NAME   the slice (required)
#   BUCKET                    gs://bucket[/prefix] for the workdir (required)
#   COMPILE_TARGET            the slice as iat_jax.aot names it, e.g. tpu:v4:2x2x4
#                             for v4-32 (required unless --skip_compile_check)
#   CHECK_DIR                 where the compile report goes (default
#                             ${TMPDIR:-/tmp}/iat-compile-check/RUN_NAME)
#   LOCAL_PYTHON              interpreter here for the check (default python3)
#   ACCELERATOR               slice type for --create (default v4-32)
#   RUNTIME_VERSION           TPU VM image for --create (default tpu-ubuntu2204-base)
#   RUN_NAME                  workdir name under BUCKET (default iat-demo)
#   CONFIG                    config file[:arg] (default experiments/configs/demo.py)
#   MODE                      train | evaluate | export | pipeline (default pipeline)
#   REPO_DIR                  checkout on the workers (default iat-jax, under ~)
#   REPO_URL                  git URL cloned by --setup
#   MOUNT                     where the bucket is mounted (default /tmp/iat-bucket)
#   PYTHON                    interpreter on the workers (default python3)
#   DRY_RUN=1                 same as --dry_run: print the commands, run nothing
# Options:
#   --create   first create the slice (gcloud compute tpus tpu-vm create)
#   --setup    first clone REPO_URL into REPO_DIR and pip-install it on every worker
#   --skip_compile_check  launch without compiling for the slice first
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
CREATE=0
SETUP=0
CHECK=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --create) CREATE=1 ;;
    --setup) SETUP=1 ;;
    --skip_compile_check) CHECK=0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (put iat_jax.main flags after --)" >&2; exit 2 ;;
  esac
  shift
done

for var in PROJECT ZONE TPU_NAME BUCKET; do
  if [[ -z "${!var:-}" ]]; then
    echo "tpu_pod.sh: set $var (see the header of $0)" >&2
    exit 2
  fi
done
if [[ "$CHECK" == 1 && -z "${COMPILE_TARGET:-}" ]]; then
  echo "tpu_pod.sh: set COMPILE_TARGET to the slice (e.g. tpu:v4:2x2x4 for v4-32) or pass --skip_compile_check" >&2
  exit 2
fi
if [[ "$BUCKET" != gs://* ]]; then
  echo "tpu_pod.sh: BUCKET must be a gs:// path, got $BUCKET" >&2
  exit 2
fi
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
RUN_NAME="${RUN_NAME:-iat-demo}"
CONFIG="${CONFIG:-experiments/configs/demo.py}"
MODE="${MODE:-pipeline}"
REPO_DIR="${REPO_DIR:-iat-jax}"
MOUNT="${MOUNT:-/tmp/iat-bucket}"
PYTHON="${PYTHON:-python3}"
LOCAL_PYTHON="${LOCAL_PYTHON:-python3}"
CHECK_DIR="${CHECK_DIR:-${TMPDIR:-/tmp}/iat-compile-check/${RUN_NAME}}"

# gs://bucket/prefix -> bucket name and prefix (the prefix becomes a directory).
bucket_path="${BUCKET#gs://}"
bucket_name="${bucket_path%%/*}"
prefix=""
[[ "$bucket_path" == */* ]] && prefix="/${bucket_path#*/}"
prefix="${prefix%/}"
workdir="${MOUNT}${prefix}/${RUN_NAME}"

# Shell words, quoted only where needed.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a"); else out+=("${a@Q}"); fi
  done
  echo "${out[*]}"
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then quote "$@"; else "$@"; fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}

if [[ "$CHECK" == 1 ]]; then
  run "$LOCAL_PYTHON" -m iat_jax.main --config="$CONFIG" --workdir="$CHECK_DIR" \
    --mode=compile --config.compile.target="$COMPILE_TARGET" "$@"
fi

if [[ "$CREATE" == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION"
fi

if [[ "$SETUP" == 1 ]]; then
  if [[ -z "${REPO_URL:-}" ]]; then
    echo "tpu_pod.sh: --setup needs REPO_URL" >&2
    exit 2
  fi
  on_all_workers "set -e; [ -d $(quote "$REPO_DIR") ] || git clone $(quote "$REPO_URL" "$REPO_DIR"); $(quote "$PYTHON") -m pip install -e $(quote "$REPO_DIR") 'jax[tpu]'"
fi

main_cmd=$(quote "$PYTHON" -m iat_jax.main --config="$CONFIG" --workdir="$workdir" \
  --mode="$MODE" --config.distributed=True "$@")
mount_cmd="mkdir -p $(quote "$MOUNT"); mountpoint -q $(quote "$MOUNT") || gcsfuse --implicit-dirs $(quote "$bucket_name" "$MOUNT")"
# glibc malloc settings that keep freed memory between steps (iat_jax/allocator.py).
malloc_env="export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864"
on_all_workers "set -e; ${mount_cmd}; mkdir -p $(quote "$workdir"); ${malloc_env}; cd $(quote "$REPO_DIR"); ${main_cmd}"
