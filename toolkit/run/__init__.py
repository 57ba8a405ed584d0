"""A run's records: its folder (rundir.py), log.txt and the console (logs.py), metrics.jsonl and
the trackers (metrics_log.py, trackers.py), summary.json (summary.py), and what watches it: the
stop request (signals.py), the hang watchdog (watchdog.py), the profiler (profiling.py), the
notification at its end (notify.py). records.py binds them for one training session."""
