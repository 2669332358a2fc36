"""What DVC shows per experiment: the promotion decision and the drift verdict as metrics, the
learning curves as a plot file."""

from __future__ import annotations

import math

import pandas as pd


def test_promotion_metrics_name_the_champion_after_the_decision():
    from tumorscope.stages.promotion import promotion_metrics

    gates = [{"name": "macro_f1", "passed": True}, {"name": "beats_champion", "passed": False}]
    refused = {"promoted": False, "challenger_version": 3, "champion_version_before": 2, "gates": gates}
    assert promotion_metrics(refused) == {"promoted": False, "challenger_version": 3, "champion_version": 2,
                                          "gates_failed": 1}
    promoted = refused | {"promoted": True, "gates": gates[:1]}
    assert promotion_metrics(promoted) == {"promoted": True, "challenger_version": 3, "champion_version": 3,
                                           "gates_failed": 0}
    first = {"promoted": False, "challenger_version": 1, "champion_version_before": None, "gates": gates}
    assert promotion_metrics(first)["champion_version"] is None


def test_verdict_metrics_keep_no_verdict_apart_from_no_drift():
    from tumorscope.stages.monitoring import verdict_metrics

    assert verdict_metrics({"status": "no_reference", "drift": None, "reason": "no champion"}) == {
        "drift": None, "drifted_share": None, "n_current": None, "referral_rising": False}
    drift = {"status": "drift", "drift": True, "drifted_share": 0.75, "n_current": 240,
             "referral": {"status": "rising"}}
    assert verdict_metrics(drift) == {"drift": True, "drifted_share": 0.75, "n_current": 240, "referral_rising": True}
    assert verdict_metrics(drift | {"drift": False, "referral": {"status": "steady"}})["referral_rising"] is False


def test_history_tsv_has_one_row_per_epoch(tmp_path):
    from tumorscope.stages.training import write_history

    # Two-phase fine-tuning: a metric first recorded in phase one has fewer values than the loss.
    history = {"loss": [1.2, 0.9, 0.7], "val_macro_f1": [0.3, 0.5, 0.6], "learning_rate": [0.01, 0.01]}
    frame = pd.read_csv(write_history(history, tmp_path / "models" / "history.tsv"), sep="\t")
    assert list(frame.columns) == ["epoch", "learning_rate", "loss", "val_macro_f1"]
    assert frame["epoch"].tolist() == [1, 2, 3] and frame["val_macro_f1"].tolist() == [0.3, 0.5, 0.6]
    assert math.isnan(frame["learning_rate"].iloc[2])
