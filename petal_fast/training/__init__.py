"""The pieces of ``petal-fast train`` (the entry point is ``petal_fast.train``), one job per module:

- :mod:`.trainer`      ``Trainer``: composes the parts below and runs the loop;
- :mod:`.data`         the training set, its class count, the per-step batch order, image preparation;
- :mod:`.model`        the model a config asks for and its train/eval split;
- :mod:`.optim`        AdamW with decay groups and the warm-up + linear-decay schedule;
- :mod:`.distributed`  process group, DDP, the class-sharded head, global gradient clipping;
- :mod:`.checkpointer` the one reader and writer of a run's files (checkpoint, ``model.pt``, summary);
- :mod:`.state`        the training-state file format (weights, optimizer, schedule, RNG, position);
- :mod:`.same_run`     whether an output folder holds this run (config comparison);
- :mod:`.run_lock`     one run per output folder at a time (``run.lock``);
- :mod:`.resources`    whether the configured model builds and fits in memory, before anything allocates;
- :mod:`.run_log`      JSON-lines log, TensorBoard, progress bar;
- :mod:`.result`       ``TrainResult``.
"""
