#!/bin/bash
# Several machines under SLURM: one task per machine, each starting one process per GPU.
#   sbatch accelerate_configs/slurm.sh recipes/lenet.py epochs=20 [name=lenet-long]
# The job survives its time limit and preemption: warned by SLURM, the run saves a checkpoint and
# stops, the job puts itself back in the queue, and when it starts again the same command continues
# the same run folder, <output_dir>/<recipe>/<name> (launch.py --autoresume). The name defaults to
# <job name>-<job id>, which a requeued job keeps.
#SBATCH --job-name=minloop
#SBATCH --nodes=2                 # EDIT: machines
#SBATCH --ntasks-per-node=1       # one launcher per machine
#SBATCH --gpus-per-node=8         # EDIT: GPUs per machine
#SBATCH --cpus-per-task=32        # EDIT
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120       # SIGTERM to this script 2 minutes before the time limit (see the trap)
#SBATCH --requeue                 # let the job requeue itself
#SBATCH --open-mode=append        # a requeued job appends to its output file
#SBATCH --output=slurm-%j.out
set -uo pipefail

case " $* " in
    *" name="*) ;;
    *) set -- "$@" "name=${SLURM_JOB_NAME:-minloop}-${SLURM_JOB_ID}" ;;
esac

# The first machine of the allocation hosts the rendezvous; the run folder (output_dir) must be on
# storage that every machine sees.
export MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${MAIN_PORT:-29500}

# SIGTERM (the time limit is near, or the job is preempted): pass it on to the run, which saves a
# checkpoint at its next step and exits; then requeue. The signal interrupts `wait`, so wait again
# for the run to finish saving before the job ends.
requeue=0
trap 'requeue=1; kill -TERM "$step" 2>/dev/null' TERM
srun bash -c 'torchrun \
    --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
    --nproc_per_node "$SLURM_GPUS_PER_NODE" \
    --rdzv_backend static --master_addr "$MAIN_HOST" --master_port "$MAIN_PORT" \
    launch.py "$@" --autoresume' bash "$@" &
step=$!
wait "$step"
status=$?
if [ "$requeue" = 1 ]; then
    wait "$step"
    status=$?
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
