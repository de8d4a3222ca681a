# shellcheck shell=bash
# Shared by launch/slurm/*.sbatch, sourced after `cd "$REPO_DIR"`: run the job step so that a signal checkpoints
# the run at a step boundary instead of killing it mid-step, and requeue the job when asked.
#
# Every path below ends with SIGTERM at the training processes; they finish the optimizer step, write a checkpoint
# (atomically) and exit 143. The job's next run resumes from it (the scripts pass --resume auto).
#   scancel --signal=TERM [--full] JOB    checkpoint and stop; `scontrol requeue JOB` later resumes the job
#   time limit, preemption, scancel JOB   Slurm's SIGTERM, SIGKILL KillWait seconds later: KillWait (30 s by
#                                         default) must exceed one step plus one checkpoint
#   #SBATCH --signal=B:USR1@300           the batch shell gets USR1 300 s before the time limit (or from
#   scancel --signal=USR1 --batch JOB     by hand): checkpoint, stop and `scontrol requeue` itself
#                                         (REQUEUE_ON_USR1=1, the default)
#
# Launchers: torch's elastic agent (torchrun, and accelerate launch, which runs it) aborts its own orderly shutdown
# when a second SIGTERM arrives (scancel --full signals srun, which forwards it, and the step), and its ranks are then
# killed mid-save with the step. Here the agent leaves SIGTERM to the ranks: Slurm signals every process of a step.

REQUEUE_ON_USR1="${REQUEUE_ON_USR1:-1}"
[[ "$REQUEUE_ON_USR1" == 0 || "$REQUEUE_ON_USR1" == 1 ]] || die "REQUEUE_ON_USR1 must be 0 or 1, got $REQUEUE_ON_USR1"

SG_STEP_PID=""
SG_CAUGHT=""

sg_on_signal() {
    if [[ -n "$SG_CAUGHT" ]]; then return 0; fi  # once: the ranks need one request
    SG_CAUGHT="$1"
    echo "batch shell: SIG$1: every rank checkpoints at the end of its step and stops" >&2
    # All steps of this job, every process in them (not this shell). Harmless when Slurm already sent it.
    scancel --signal=TERM "${SLURM_JOB_ID:?}" || true
}
trap 'sg_on_signal TERM' TERM
trap 'sg_on_signal USR1' USR1

# The launchers of the step ignore SIGTERM (see "Launchers" above): SG_GUARD runs a command with SIGTERM ignored
# (a disposition exec keeps), and torch's elastic agent must not install its own handler over it. The ranks re-arm
# SIGTERM when they start (sg_distributed.training.signals.rearm_sigterm).
# shellcheck disable=SC2034  # used by the scripts that source this file
SG_GUARD=(bash -c 'trap "" TERM; exec "$@"' _)
sg_launcher_env() {
    export PET_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT"  # torchrun --signals_to_handle (accelerate parses it too)
}

# sg_run_step CMD...: run the job step (srun ...) in the background so that the traps fire while it runs (bash runs
# a trap only between commands), wait for it, requeue after USR1, and return the step's exit code.
sg_run_step() {
    local rc
    "$@" &
    SG_STEP_PID=$!
    while :; do
        rc=0
        wait "$SG_STEP_PID" || rc=$?
        # >128 with the step still there: a trapped signal interrupted `wait`; keep waiting
        if ((rc > 128)) && kill -0 "$SG_STEP_PID" 2>/dev/null; then continue; fi
        break
    done
    if [[ "$SG_CAUGHT" == USR1 && "$REQUEUE_ON_USR1" == 1 ]]; then
        echo "batch shell: requeueing job $SLURM_JOB_ID; its next run resumes from the last checkpoint" >&2
        scontrol requeue "$SLURM_JOB_ID"
    elif [[ -n "$SG_CAUGHT" ]]; then
        echo "batch shell: stopped by SIG$SG_CAUGHT (step exit code $rc); \`scontrol requeue $SLURM_JOB_ID\`" \
            "or a new sbatch with the same CKPT_DIR resumes from the last checkpoint" >&2
    fi
    return "$rc"
}
