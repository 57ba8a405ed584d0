"""What a run keeps: checkpoints and their train state (checkpoint.py), weights in and out
(weights.py), `launch.py export` (export.py), and what a resume may change (resume.py)."""
