#!/bin/bash
# Several machines under SLURM: one task per machine, each starting one process per GPU.
#   sbatch accelerate_configs/slurm.sh recipes/lenet.py epochs=20
#SBATCH --job-name=minloop
#SBATCH --nodes=2                 # EDIT: machines
#SBATCH --ntasks-per-node=1       # one launcher per machine
#SBATCH --gpus-per-node=8         # EDIT: GPUs per machine
#SBATCH --cpus-per-task=32        # EDIT
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120         # SIGTERM 2 minutes before the time limit: the run saves and stops
#SBATCH --output=slurm-%j.out
set -euo pipefail

# The first machine of the allocation hosts the rendezvous; the run folder (output_dir) must be on
# storage that every machine sees. After a preemption or the time limit, resume with:
#   sbatch accelerate_configs/slurm.sh resume runs/<recipe>/<run>
export MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${MAIN_PORT:-29500}

srun bash -c 'torchrun \
    --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
    --nproc_per_node "$SLURM_GPUS_PER_NODE" \
    --rdzv_backend static --master_addr "$MAIN_HOST" --master_port "$MAIN_PORT" \
    launch.py "$@"' bash "$@"
