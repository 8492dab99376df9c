"""Running on a cluster, before any model code: how ranks find each other and what layout fits.

- ``launch``: launch helpers — DeepSpeed hostfiles, Slurm node lists and per-node commands
  (the CLI behind ``tools/slurm/*.sbatch``), ``mpirun`` rank discovery (``discover_dist_env``).
- ``plan``: the memory / step-time planner behind ``tools/plan.py`` (which TP x PP x DP layouts
  fit, per-GPU memory, estimated MFU).

Neither imports torch or DeepSpeed: both run on a login node.
"""
