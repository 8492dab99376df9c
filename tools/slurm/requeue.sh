# Sourced by the sbatch templates: run one srun step, and on SIGTERM (preemption, or
# `#SBATCH --signal=B:TERM@120` before the time limit) let megagpt save, then requeue the job.
#
# Flow: Slurm signals only this batch shell (the "B:" in --signal). The trap forwards SIGTERM
# to srun, which forwards it to every task on every node; the trainers save a checkpoint at the
# next step boundary and exit 0. Once the step has ended the job is requeued; the next run gets
# the same job id (hence the same master port) and resumes from the latest complete checkpoint.

megagpt_run_step() {
    # usage: megagpt_run_step srun [srun args...] -- command...
    "$@" &
    MEGAGPT_STEP_PID=$!
    trap megagpt_on_term TERM
    local rc=0
    wait "$MEGAGPT_STEP_PID" || rc=$?
    # `wait` returns early when the trap fires; the trap itself waits for the step and exits.
    trap - TERM
    return "$rc"
}

megagpt_on_term() {
    echo "[megagpt] $(date -u +%FT%TZ) SIGTERM: asking trainers to checkpoint and stop" >&2
    kill -TERM "$MEGAGPT_STEP_PID" 2>/dev/null || true
    local rc=0
    wait "$MEGAGPT_STEP_PID" || rc=$?
    echo "[megagpt] step exited with $rc" >&2
    if [ "${MEGAGPT_REQUEUE:-1}" = "1" ]; then
        echo "[megagpt] requeueing job ${SLURM_JOB_ID}" >&2
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    exit 0
}
