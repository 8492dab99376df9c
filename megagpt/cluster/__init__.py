"""Running on a cluster, before any model code; neither module imports torch or DeepSpeed, so both
run on a login node. ``launch``: DeepSpeed hostfiles, Slurm node lists and per-node commands (the CLI
behind ``tools/slurm/*.sbatch``), ``mpirun`` rank discovery. ``plan``: the memory / step-time
planner behind ``tools/plan.py`` (which TP x PP x DP layouts fit, per-GPU memory, estimated MFU).
"""
