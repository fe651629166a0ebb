#!/bin/bash
#SBATCH --job-name=terabrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one rank per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append           # a requeued job adds to the same log
#SBATCH --requeue                    # the job may be put back in the queue (same job id)
#SBATCH --signal=B:USR1@120          # SIGUSR1 to this script 120 s before the time limit

# A port of our own, the same on every rank (terabrain derives one from the job id if unset).
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK

# The job id survives a requeue, so every start of this job names the same run directory, and
# --resume-if-exists makes the one command start the run or continue it from its checkpoint.
RUN="$SLURM_SUBMIT_DIR/runs/lbann-ae-50k-$SLURM_JOB_ID"

# 8 ranks: model parallelism inside each node (4), data parallelism across the 2 nodes.
# Started in the background so that this script can pass the time-limit warning on.
srun --kill-on-bad-exit=1 python -m terabrain train lbann-ae-50k \
    --set parallel.model=4 --set parallel.data=2 \
    --out "$RUN" --resume-if-exists &
step=$!

# B:USR1 reaches only this script; srun forwards the signal to every rank. The ranks agree
# on the next step boundary, write a checkpoint of it and exit with code 75.
warned=0
trap 'warned=1; kill -USR1 "$step"' USR1
wait "$step"
code=$?
if [ "$warned" = 1 ]; then   # the trap interrupted `wait`: wait for the ranks' own exit
    wait "$step"
    code=$?
fi

# 75: pre-empted with a checkpoint; back into the queue, where this script runs again and
# the run continues. (A pre-emption by SLURM itself, PreemptMode=REQUEUE, sends SIGTERM to
# the ranks, which stop the same way, and requeues the job by itself.)
if [ "$code" = 75 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$code"

# By hand, after a crash (any number of ranks works):
#   srun python -m terabrain train --resume runs/lbann-ae-50k-<jobid> --set parallel.model=4
