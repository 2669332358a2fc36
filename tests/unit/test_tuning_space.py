"""Search space parsing, conditional suggestions, group-bootstrap intervals and leaderboard order."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from helpers.params import defaults, params_where, section
from helpers.paths import REPO
from tumorscope.config import ConfigError, TrainConfig
from tumorscope.models.evaluate import group_bootstrap
from tumorscope.tuning.leaderboard import leaderboard
from tumorscope.tuning.space import suggest_train_config

SPACE = params_where("tune.search_space", {
    "architecture": ["small_cnn", "mobilenet_v2"], "lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "filters": [8, 16], "unfreeze_top_n": [-1, 20], "dense_units": {"low": 32, "high": 128, "step": 32}}).tune.search_space


@pytest.mark.parametrize("space, key_text", [
    ({}, "search space is empty"),
    ({"architecture": ["alexnet"]}, "'architecture' choice 'alexnet'"),
    ({"epochs": [1, 2]}, "'epochs' is not a tunable train setting"),
    ({"lr": {"low": 0.1, "high": 0.01}}, "'lr' range: Value error, low (0.1) must be below high"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "log range needs low > 0"),
    ({"dense_units": {"low": 1.5, "high": 8}}, "integer setting"),
    ({"norm": {"low": 0, "high": 1}}, "categorical: give a list"),
    ({"dropout": [0.2, 1.5]}, "'dropout' choice 1.5"),
    ({"batch_size": []}, "'batch_size' has no choices"),
])
def test_bad_search_space_names_the_key(space, key_text):
    with pytest.raises(ConfigError) as err:
        params_where("tune.search_space", space)
    assert "tune.search_space" in str(err.value) and key_text in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_architecture_limit_is_rejected():
    with pytest.raises(ConfigError, match="tune.architecture_concurrency"):
        params_where("tune.architecture_concurrency", {"alexnet": 1})


def test_suggestions_are_conditional_on_the_architecture():
    cnn = suggest_train_config(optuna.trial.FixedTrial({"architecture": "small_cnn", "lr": 0.001, "filters": 8,
                                                        "dense_units": 64}), section(TrainConfig), SPACE, epochs=3)
    assert (cnn.architecture, cnn.filters, cnn.dense_units, cnn.epochs) == ("small_cnn", 8, 64, 3)
    assert cnn.unfreeze_top_n == section(TrainConfig).unfreeze_top_n  # not suggested for the small CNN
    # FixedTrial raises if a parameter it does not hold is suggested: filters must not be.
    app = suggest_train_config(optuna.trial.FixedTrial({"architecture": "mobilenet_v2", "lr": 0.002,
                                                        "unfreeze_top_n": 20, "dense_units": 96}),
                               section(TrainConfig), SPACE, epochs=3)
    assert (app.architecture, app.unfreeze_top_n, app.dense_units, app.filters) == ("mobilenet_v2", 20, 96, 16)


def test_default_params_space_is_valid():
    assert "architecture" in defaults().tune.search_space


def test_group_bootstrap_counts_duplicate_groups_once():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 50)
    predicted = np.where(rng.random(200) < 0.8, labels, (labels + 1) % 4)
    singletons = group_bootstrap(labels, predicted, np.arange(200), 4, 500, 0.95, seed=0)
    # The same predictions where every 10 neighbouring slices are one near-duplicate group.
    grouped = group_bootstrap(labels, predicted, np.arange(200) // 10, 4, 500, 0.95, seed=0)
    width = lambda r: r["macro_f1"]["high"] - r["macro_f1"]["low"]  # noqa: E731
    assert grouped["n_groups"] == 20 and singletons["n_groups"] == 200
    assert width(grouped) > width(singletons)  # fewer independent pieces of evidence, wider interval
    for result in (singletons, grouped):
        assert result["macro_f1"]["low"] <= result["macro_f1"]["mean"] <= result["macro_f1"]["high"]


def test_group_bootstrap_of_perfect_predictions_is_a_point():
    labels = np.array([0, 0, 1, 1, 2, 2])
    result = group_bootstrap(labels, labels, np.array([0, 0, 1, 1, 2, 2]), 3, 100, 0.9, seed=0)
    assert result["macro_f1"] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert all(r["low"] == 1.0 for r in result["recall"])


def _trial(number: int, low: float, point: float, feasible: bool = True, degenerate: str | None = None):
    interval = {"mean": point, "low": low, "high": min(1.0, point + 0.1)}
    scores = {"macro_f1": point, "macro_f1_ci": interval, "critical_recall": 0.9,
              "critical_recall_ci": {"mean": 0.9, "low": 0.8, "high": 1.0}, "recall": {}, "degenerate": degenerate is not None,
              "degenerate_reason": degenerate or ""}
    return optuna.trial.create_trial(
        params={"lr": 0.001}, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
        value=point, user_attrs={"scores": scores, "feasible": feasible, "architecture": "small_cnn"})


def test_leaderboard_ranks_by_interval_lower_bound_feasible_first():
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(0, low=0.60, point=0.95))  # lucky point estimate, wide interval
    study.add_trial(_trial(1, low=0.80, point=0.88))
    study.add_trial(_trial(2, low=0.90, point=0.97, feasible=False))  # misses the tumour-recall constraint
    assert [row["trial"] for row in leaderboard(study, "macro_f1")] == [1, 0, 2]
    study.add_trial(_trial(3, low=0.95, point=0.99, feasible=False, degenerate="one class"))
    assert [row["trial"] for row in leaderboard(study, "macro_f1")] == [1, 0, 2, 3]  # collapsed: last


def test_a_model_predicting_only_the_critical_class_is_never_feasible():
    """Seen in make run: a trial predicting "Tumor" for every slice met the tumour-recall
    constraint (recall 1.0), ranked first and trained a degenerate final model."""
    from tumorscope.models.evaluate import score_predictions
    from tumorscope.tuning.study import infeasibility

    classes = ["Cyst", "Normal", "Stone", "Tumor"]
    labels = np.repeat(np.arange(4), 5)
    all_tumour = np.tile(np.eye(4)[3], (20, 1))
    scores = score_predictions(labels, all_tumour, np.arange(20), classes, defaults().evaluate, 0)
    assert scores["critical_recall"] == 1.0 and scores["degenerate"]
    assert infeasibility(scores, 0.8) == "predictions collapse to one class"
    good = score_predictions(labels, np.eye(4)[labels], np.arange(20), classes, defaults().evaluate, 0)
    assert good["degenerate"] is False and infeasibility(good, 0.8) is None
    assert infeasibility({**good, "critical_recall": 0.5}, 0.8) == "critical recall 0.500 < 0.8"


def test_deployment_parameters_override_only_what_they_name():
    from flows.tuning import deployment_overrides, effective_params
    from helpers.paths import REPO

    path = str(REPO / "params.yaml")
    overrides = deployment_overrides(path, ["small_cnn", "resnet50"], 3, "/data/ct", None)
    params = effective_params(path, overrides)
    base = defaults()
    assert params.tune.search_space["architecture"] == ["small_cnn", "resnet50"]
    assert {k: v for k, v in params.tune.search_space.items() if k != "architecture"} == {
        k: v for k, v in base.tune.search_space.items() if k != "architecture"}
    assert (params.tune.n_trials, params.tune.workers, params.data.source) == (3, base.tune.workers, "/data/ct")
    assert deployment_overrides(path, None, None, None, None) == {}


def test_study_identity_hashes_only_what_trials_depend_on():
    """A new full budget (train.epochs) or a new value of a searched setting continues the study;
    other data preprocessing or a fixed train setting the trials use starts a new one."""
    from tumorscope.config import with_overrides
    from tumorscope.tuning.study import stored_study_name

    base = defaults()
    same = [{"train": {"epochs": 200}}, {"train": {"model_dir": "elsewhere"}}, {"train": {"lr": 0.01}},
            {"tune": {"n_trials": 40, "workers": 1}}, {"evaluate": {"distance_bands": [2, 6]}}]
    for overrides in same:
        assert stored_study_name(with_overrides(base, overrides)) == stored_study_name(base), overrides
    different = [{"preprocess": {"clahe": True}}, {"preprocess": {"image_size": 128}}, {"train": {"patience": 3}},
                 {"tune": {"trial_epochs": 5}}, {"evaluate": {"bootstrap_samples": 200}}, {"seed": 1}]
    for overrides in different:
        assert stored_study_name(with_overrides(base, overrides)) != stored_study_name(base), overrides


# Another valid value of every train.* and evaluate.* setting: a new setting must be added here, so
# that whether it reaches the study's identity and the tune stage is decided, not forgotten.
OTHER_VALUES = {
    "train": {"model_dir": "elsewhere", "architecture": "mobilenet_v2", "weights": "local_notop.h5",
              "fit": "linear_probe", "probe_c": [0.5], "head_epochs": 2, "unfreeze_top_n": 10, "fine_tune_lr": 0.01,
              "epochs": 7, "batch_size": 8, "lr": 0.01, "dropout": 0.1, "filters": 8, "dense_units": 16,
              "augment_strength": 0.3, "augment_in": "model", "intensity_augment": 0.2, "export_augment": 0.5,
              "balanced_batches": True, "norm": "batch", "class_weights": False, "patience": 3,
              "monitor": "val_macro_f1", "warmup_epochs": 2, "precision": "float32", "gpu_batch_multiplier": 2,
              "distribution": "none", "loader_workers": 3, "ensemble_members": 3, "init_weights": "champion.keras"},
    "evaluate": {"out_dir": "elsewhere", "metrics_path": "m.json", "calibration_bins": 5, "critical_class": "Stone",
                 "bootstrap_samples": 50, "confidence": 0.9, "max_single_class_share": 0.9, "fail_on_degenerate": False,
                 "distance_bands": [2, 6], "test_time_augmentation": "flip"},
}


@pytest.mark.parametrize(("section", "name"), [(section, name) for section, values in OTHER_VALUES.items()
                                               for name in values])
def test_each_setting_reaches_the_study_identity_and_the_tune_stage_exactly_when_trials_use_it(section, name):
    """``trial_inputs`` is the one list: the study's hash changes with a setting exactly when it is a
    trial input that no trial overrides (not searched), and dvc.yaml's tune stage lists exactly the
    trial inputs, so ``dvc status`` sees the same changes (plus the searched settings' fixed values)."""
    import yaml

    from tumorscope.config import with_overrides
    from tumorscope.tuning.study import stored_study_name, trial_inputs

    base = defaults()
    key = f"{section}.{name}"
    changed = with_overrides(base, {section: {name: OTHER_VALUES[section][name]}})
    assert getattr(getattr(changed, section), name) != getattr(getattr(base, section), name)
    is_input = key in trial_inputs(base)
    searched = section == "train" and name in base.tune.search_space
    assert (stored_study_name(changed) != stored_study_name(base)) == (is_input and not searched), key

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["tune"]["params"]
    listed = {entry for entry in stage if isinstance(entry, str)}
    assert (key in listed or section in listed) == is_input, f"{key}: dvc.yaml's tune stage and trial_inputs differ"


def test_every_setting_has_another_value_to_try():
    from tumorscope.config import EvaluateConfig, TrainConfig

    assert set(OTHER_VALUES["train"]) == set(TrainConfig.model_fields)
    assert set(OTHER_VALUES["evaluate"]) == set(EvaluateConfig.model_fields)
