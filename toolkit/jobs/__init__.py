"""Many runs: grids (sweep.py), searches with Optuna (search.py, its space in space.py, a trial's
side in trial.py), what both share (launching.py), K runs at once on their own GPUs or cores
(pool.py), the table and curves of runs (runs.py: `launch.py runs`, `launch.py plot`), and the LR
range test (lr_find.py: `launch.py lr-find`)."""
