# Sourced by the sbatch templates: run one srun step, and on SIGTERM (preemption, or
# `#SBATCH --signal=B:TERM@120` before the time limit) let megagpt save, then requeue the job.
#
# Flow: Slurm signals only this batch shell (the "B:" in --signal). The trap asks Slurm to send
# SIGTERM to every task of the job's steps on every node (`scancel --signal=TERM JOBID`: without
# --batch/--full it spares the batch step, i.e. this shell and srun); the trainers save a
# checkpoint at the next step boundary and exit 0, srun exits, and the trap requeues the job. The
# next run gets the same job id (hence the same master port) and resumes from the latest complete
# checkpoint.
#
# Not `kill -TERM <srun pid>`: srun answers SIGTERM with "forcing job termination" and sends
# SIGKILL to every task, killing the trainers mid-save (seen under a real Slurm 22.05,
# tests/test_slurm.py). When Slurm itself ends the job (`scontrol requeue`, scancel, preemption)
# it sends SIGTERM to every process of every step, trainers included, and refuses srun's SIGKILL
# for a job already completing; the trap then only waits for the trainers to save.

megagpt_run_step() {
    # usage: megagpt_run_step srun [srun args...] command...
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
    trap '' TERM   # a second SIGTERM (Slurm ending the job) must not re-enter the trap
    local state
    state=$(squeue -h -j "${SLURM_JOB_ID}" -o %T 2>/dev/null || true)
    if [ -n "$state" ] && [ "$state" != RUNNING ]; then
        # Slurm is ending the job itself (`scontrol requeue`, scancel, preemption): it has already
        # sent SIGTERM to every task and will requeue (or not) on its own; scancel would only
        # retry against a completing job for a minute.
        echo "[megagpt] $(date -u +%FT%TZ) SIGTERM: job ${SLURM_JOB_ID} is ${state}; Slurm signalled the trainers" >&2
        wait "$MEGAGPT_STEP_PID" || true
        exit 0
    fi
    echo "[megagpt] $(date -u +%FT%TZ) SIGTERM: asking trainers to checkpoint and stop" >&2
    scancel --signal=TERM "${SLURM_JOB_ID}" ||
        echo "[megagpt] scancel --signal=TERM ${SLURM_JOB_ID} failed" >&2
    local rc=0
    wait "$MEGAGPT_STEP_PID" || rc=$?
    echo "[megagpt] step exited with $rc" >&2
    if [ "${MEGAGPT_REQUEUE:-1}" = "1" ]; then
        echo "[megagpt] requeueing job ${SLURM_JOB_ID}" >&2
        scontrol requeue "${SLURM_JOB_ID}" ||
            echo "[megagpt] scontrol requeue ${SLURM_JOB_ID} failed" >&2
    fi
    exit 0
}
