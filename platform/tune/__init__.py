"""Hyperparameter sweeps on Ray Tune: the pools' sizes and top-k (optionally prompt dimension and learning rate),
searched by Optuna's TPE with ASHA early stopping, every trial a Ray Train run of the training job.

- :mod:`~datprl.platform.tune.config`: the typed config (:class:`~datprl.platform.tune.config.TuneConfig`: a
  training recipe, the search space's ranges, the search's settings, the metric), checked before Ray starts;
- :mod:`~datprl.platform.tune.sweep`: the driver (``jobs/tune.py``): the trial function, the search, resume after the
  driver dies, the console lines;
- :mod:`~datprl.platform.tune.report`: the outputs (table as markdown and CSV, plot, best config as a training YAML,
  the Optuna study in SQLite).
"""
