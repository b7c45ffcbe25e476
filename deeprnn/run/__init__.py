"""What a run leaves in its workdir and how it lives: `checkpoints` (Orbax, trusted only with a
completion record), `lifecycle` (the workdir lock, stop signals, exit statuses), `writers`
(TensorBoard events, metrics.jsonl), `summary` (summary.json and the one "finished" rule),
`console` (the progress line), `metadata` (what a run records about its machine and code) and
`process` (compilation cache, host heap). The training loop and the programs use these; none of
them trains anything.
"""
