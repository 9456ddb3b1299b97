#!/bin/bash
# Shared body of slurm/pretrain.sbatch and slurm/sft.sbatch: runs one igpt training stage on the nodes of a Slurm
# allocation and requeues the job when the run was preempted. Called as
#     bash slurm/launch.sh <stage> [hydra overrides...]
# from inside a batch job. The pattern follows torchrun's documented multi-node launch (one `torchrun` per node via
# `srun`, c10d rendezvous on the first node of the allocation) and Slurm's requeue-on-signal recipe (`--signal=B:...`
# trapped by the batch shell, then `scontrol requeue`).
#
# Environment knobs (all optional):
#   IGPT_PYTHON          the Python that has igpt installed (default: python3 on PATH, e.g. from an activated venv)
#   IGPT_NPROC_PER_NODE  processes per node (default: GPUs on the node, or the allocated CPUs when it has none)
#   IGPT_MASTER_PORT     rendezvous port on the first node (default: 20000 + job id % 20000)
#   IGPT_RUNS_DIR        where run directories go when no run_dir= override is given (default: runs)
set -uo pipefail

stage="${1:?usage: launch.sh <stage> [hydra overrides...]}"
shift

log() { echo "[igpt-slurm $(date '+%F %T')] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/launch.sh must run inside a Slurm job: submit it with 'sbatch slurm/${stage}.sbatch [overrides]'" >&2
    exit 2
fi

# ----------------------------------------------------------------------------------------------------------------------
# Overrides: the user's own run_dir=, resume=, strategy= win; the defaults below fill in what they left out.
run_dir=""
has_resume=0
has_strategy=0
for arg in "$@"; do
    case "$arg" in
        run_dir=*|+run_dir=*|++run_dir=*) run_dir="${arg#*run_dir=}" ;;
        resume=*|+resume=*|++resume=*) has_resume=1 ;;
        strategy=*|+strategy=*|++strategy=*) has_strategy=1 ;;
    esac
done
# The job id survives `scontrol requeue`, so a restarted job finds and resumes its own run directory.
if [ -z "$run_dir" ]; then
    run_dir="${IGPT_RUNS_DIR:-runs}/${SLURM_JOB_NAME:-igpt}-${SLURM_JOB_ID}"
fi
mkdir -p "$run_dir/logs" || { echo "cannot create run directory $run_dir" >&2; exit 2; }
run_dir="$(cd "$run_dir" && pwd)"

# Everything this script and the training processes print goes to one log in the run directory, appended across
# restarts; the file named by #SBATCH --output only keeps this pointer.
log_file="$run_dir/logs/slurm-${SLURM_JOB_ID}.log"
log "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) logs to $log_file"
exec >>"$log_file" 2>&1
log "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}, submitted from ${SLURM_SUBMIT_DIR:-?}"

# ----------------------------------------------------------------------------------------------------------------------
# Processes per node: GPUs allocated on the node, else GPUs nvidia-smi sees, else the CPUs allocated to the launcher.
count_gpus() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ] 2>/dev/null; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
nproc="${IGPT_NPROC_PER_NODE:-}"
if [ -z "$nproc" ]; then
    nproc="$(count_gpus)"
    if [ "${nproc:-0}" -eq 0 ]; then
        nproc="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"
    fi
fi
nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
world=$((nnodes * nproc))

master_addr="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
master_port="${IGPT_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
python="${IGPT_PYTHON:-python3}"

overrides=("+stage=${stage}" "run_dir=${run_dir}")
[ "$has_resume" -eq 1 ] || overrides+=("resume=auto")
[ "$has_strategy" -eq 1 ] || [ "$world" -eq 1 ] || overrides+=("strategy=ddp")
for arg in "$@"; do
    case "$arg" in
        run_dir=*|+run_dir=*|++run_dir=*) ;;
        *) overrides+=("$arg") ;;
    esac
done

# ----------------------------------------------------------------------------------------------------------------------
# Preemption: Slurm signals this shell (#SBATCH --signal=B:USR1@<s> before the time limit, SIGTERM on preemption or
# scancel; a cancelled job checkpoints but is not requeued). The trap asks the run to stop by creating <run_dir>/STOP: every rank finishes its optimizer step, saves a
# checkpoint, rank 0 writes <run_dir>/preempted, and torchrun exits 0. A file is used rather than forwarding the
# signal because torchrun dies on a raw SIGUSR1, and on SIGTERM it gives its workers only a fixed grace period before
# SIGKILL, which a large checkpoint may not fit in.
preempt_signal=""
cancelled=""
job_state() { scontrol show job -o "${SLURM_JOB_ID}" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
on_signal() {
    preempt_signal="$1"
    log "received SIG$1: asking the run to checkpoint and stop (touch $run_dir/STOP)"
    touch "$run_dir/STOP"
    # A plain `scancel` sends SIGTERM too, but the job is already ending (COMPLETING or CANCELLED; a preempted job or
    # `scancel --signal` still shows RUNNING): checkpoint and stop, never requeue a job the user cancelled.
    case "$(job_state)" in
        CANCELLED|COMPLETING) cancelled=1 ;;
    esac
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# A STOP or preempted file left by the previous attempt must not stop or requeue this one.
rm -f "$run_dir/STOP" "$run_dir/preempted"

srun_args=(--nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

log "stage=${stage} nodes=${nnodes} nproc_per_node=${nproc} rendezvous=${master_addr}:${master_port} run_dir=${run_dir}"
log "overrides: ${overrides[*]}"

# srun runs in the background and the shell waits for it, so the traps above fire while training runs.
srun "${srun_args[@]}" \
    "$python" -m torch.distributed.run \
        --nnodes="$nnodes" \
        --nproc_per_node="$nproc" \
        --rdzv_backend=c10d \
        --rdzv_endpoint="${master_addr}:${master_port}" \
        --rdzv_id="${SLURM_JOB_ID}" \
        igpt/train.py "${overrides[@]}" &
srun_pid=$!
while :; do
    wait "$srun_pid"
    rc=$?
    # wait returns early (status > 128) when a trapped signal arrives; keep waiting while srun still runs.
    if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then
        continue
    fi
    break
done
trap - USR1 TERM INT

if [ -f "$run_dir/preempted" ] && [ -n "$cancelled" ]; then
    log "run stopped early ($(cat "$run_dir/preempted")); job ${SLURM_JOB_ID} was cancelled, so it is not requeued" \
        "(submit the same command to resume from the checkpoint)"
    rm -f "$run_dir/STOP"
    exit 0
fi
if [ -f "$run_dir/preempted" ]; then
    log "run stopped early ($(cat "$run_dir/preempted")); requeueing job ${SLURM_JOB_ID}"
    rm -f "$run_dir/STOP"
    if scontrol requeue "${SLURM_JOB_ID}"; then
        exit 0
    fi
    log "scontrol requeue failed (is the partition requeue-able? JobRequeue / --requeue); resubmit to resume"
    exit 1
fi
if [ -n "$preempt_signal" ]; then
    log "received SIG${preempt_signal} but the run wrote no $run_dir/preempted (srun exit code $rc); not requeueing"
fi
log "srun finished with exit code $rc"
exit "$rc"
