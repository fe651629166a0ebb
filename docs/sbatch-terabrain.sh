#!/bin/bash
#SBATCH --job-name=terabrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # one rank per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

# A port of our own, the same on every rank (terabrain derives one from the job id if unset).
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK

# 8 ranks: model parallelism inside each node (4), data parallelism across the 2 nodes.
srun --kill-on-bad-exit=1 python -m terabrain train lbann-ae-50k \
    --set parallel.model=4 --set parallel.data=2 \
    --out "$SLURM_SUBMIT_DIR/runs/lbann-ae-50k-$SLURM_JOB_ID"

# After a crash or a preemption, resubmit with --resume (any number of ranks works):
#   srun python -m terabrain train --resume runs/lbann-ae-50k-<jobid> --set parallel.model=4
