"""Optuna study over the train.* search space in params.yaml, every trial tracked in MLflow.

* ``space``: what a trial draws from tune.search_space (conditional on the architecture);
* ``study``: the study in its RDB storage, its MLflow parent run, the objective and the worker
  loop (`run_worker` pulls trials until the study has tune.n_trials finished ones, so a restarted
  or second worker continues the same study);
* ``leaderboard``: the ranking of finished trials, the best parameters, the plots.

The leaderboard ranks complete, feasible trials by the lower bound of a bootstrap interval over
duplicate groups of the validation split, not by one point estimate that a lucky split inflates.
"""
