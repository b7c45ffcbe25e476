"""What a run leaves in its workdir and how it lives: `checkpoints` (Orbax, trusted only with a
completion record whose `digests` every restore checks), `lifecycle` (the workdir lock, stop
signals, exit statuses), `writers` (TensorBoard events, metrics.jsonl), `summary` (summary.json
and the one "finished" rule), `console` (the progress line and the last line), `library_log`
(the libraries' tracebacks kept off the console), `metadata` (what a run records about its
machine and code), `process` (compilation cache, host heap) and `sweep_results` (a sweep's
table and plots). The training loop and the programs use these; none of them trains anything.
"""
