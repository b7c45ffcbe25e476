"""Training: pure steps, their mapping onto devices, and the loop that runs them.

`train_step` holds the per-device train and eval steps (metrics as sums and token counts) and
`optimizer` the clipped SGD or Adam; `device_batches` runs several steps per compiled call on
windows cut on the device (and evaluation as a compiled loop); `parallel` maps the steps over
every device of every host, `hosts` makes every host of a multi-host run load the same text,
and `seeds` vmaps K seeds on one device; `setup` rebuilds a run from its flags and
`memory_check` refuses one that cannot fit; `progress` keeps the loop's bookkeeping,
`evaluation` scores whole splits, `trained_run` reads a finished run back for the generate and
evaluate programs, and `loop` trains in named phases.
"""
