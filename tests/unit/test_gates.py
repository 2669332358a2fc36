"""The promotion gates as pure policy (tumorscope.gates): no registry needed."""

from __future__ import annotations

from types import SimpleNamespace

from helpers.params import section
from tumorscope.config import PromoteConfig
from tumorscope.gates import absolute_gates, acquisition_gate, comparison_gate, decision_line, readings_gate, rollback_gate

CFG = section(PromoteConfig, min_macro_f1_low=0.7, min_critical_recall_low=0.8, max_ece=0.1, min_improvement=0.0)


def shortcuts(intensity_low=0.2, thumbnail_low=0.1):
    return {"acquisition_baselines": {name: {"model_minus_baseline": {"low": low}}
                                      for name, low in (("intensity", intensity_low), ("thumbnail", thumbnail_low))}}


def scores(f1_low=0.75, recall_low=0.85, ece=0.05, degenerate=False, coverage=0.9, raw_ece=0.3, shortcut=None):
    trust = {"calibration": {"ece_after": {"value": ece}},
             "conformal": {"target_coverage": 0.9, "coverage": {"value": coverage}}}
    return {"macro_f1_ci": {"low": f1_low}, "critical_recall_ci": {"low": recall_low}, "ece": raw_ece,
            "degenerate": degenerate, "degenerate_reason": "one class" if degenerate else "", "critical_class": "Tumor",
            "trust": trust, "shortcuts": shortcut or shortcuts()}


def test_absolute_gates_use_the_interval_lows_and_name_what_failed():
    assert all(g.passed for g in absolute_gates(scores(), CFG))  # the raw ECE (0.3) is not what is judged
    failed = [g.name for g in absolute_gates(scores(f1_low=0.69, ece=0.2, degenerate=True, coverage=0.84), CFG)
              if not g.passed]
    assert failed == ["macro_f1", "calibration", "coverage", "not_degenerate"]
    assert absolute_gates(scores(coverage=0.86), CFG)[3].passed  # within promote.coverage_tolerance (0.05)
    untrusted = {k: v for k, v in scores().items() if k != "trust"}
    assert [g.name for g in absolute_gates(untrusted, CFG) if not g.passed] == ["calibration", "coverage"]
    undefined = absolute_gates(scores(recall_low=None), CFG)[1]
    assert not undefined.passed and "undefined" in undefined.detail  # no Tumor in the test set: not a pass


def test_a_model_that_does_not_beat_an_acquisition_only_baseline_is_refused():
    gate = acquisition_gate(shortcuts(intensity_low=0.2, thumbnail_low=-0.05))
    assert not gate.passed and gate.value == -0.05 and "thumbnail -0.050" in gate.detail
    assert acquisition_gate(shortcuts()).passed
    assert not acquisition_gate(None).passed  # evaluated by an older version: not a pass
    failed = [g.name for g in absolute_gates(scores(shortcut=shortcuts(intensity_low=0.0)), CFG) if not g.passed]
    assert failed == ["beats_acquisition_baselines"]  # an interval touching 0 is not a win
    off = CFG.model_copy(update={"require_beating_acquisition_baselines": False})
    assert "beats_acquisition_baselines" not in [g.name for g in absolute_gates(scores(), off)]


def test_the_champion_comparison_needs_its_interval_above_the_margin():
    assert comparison_gate(None, CFG).passed  # no champion yet
    comparison = {"low": -0.01, "high": 0.05, "macro_f1_difference": 0.02, "n_groups": 11,
                  "mcnemar": {"a_only": 3, "b_only": 2, "p_value": 1.0}}
    assert not comparison_gate(comparison, CFG).passed
    assert comparison_gate(comparison, CFG.model_copy(update={"min_improvement": -0.02})).passed  # non-inferiority


def test_a_rolled_back_version_is_refused_and_the_line_puts_failures_first():
    rolled = SimpleNamespace(tags={"rolled_back": '{"by": "dr-a", "at": "2026-12-01", "reason": "bad stones"}'})
    gate = rollback_gate(rolled)
    assert not gate.passed and "dr-a" in gate.detail and "bad stones" in gate.detail
    assert rollback_gate(SimpleNamespace(tags={})).passed
    checks = [*absolute_gates(scores(ece=0.3), CFG), gate]
    line = decision_line("m/3", False, checks, "m/2")
    assert line.startswith("promote: m/3 refused (calibration, not_rolled_back) against champion m/2; calibration FAIL")


def test_the_comparison_on_read_slices_is_reported_unless_a_margin_makes_it_a_gate():
    on_readings = {"n_slices": 12, "macro_f1_difference": -0.05, "low": -0.20, "high": 0.08}
    assert readings_gate(on_readings, section(PromoteConfig)) is None  # params.yaml: null, reported only
    gated = section(PromoteConfig, min_improvement_on_readings=-0.1)
    refused = readings_gate(on_readings, gated)
    assert refused is not None and not refused.passed and "on 12 read slices -0.050 [-0.200, +0.080]" in refused.detail
    assert readings_gate(on_readings | {"low": -0.05}, gated).passed
    nothing_read = readings_gate({"n_slices": 0}, gated)
    assert nothing_read.passed and nothing_read.detail == "no read slice in the test split"


def test_slices_of_harvested_review_batches_are_told_apart_from_the_rest():
    from tumorscope.stages.promotion import read_by_radiologists

    paths = ["data/raw/Tumor/Tumor- (3).png",                                    # the source's own slice
             "data/raw/Tumor/added/reviewed-20261206T101500Z-0a1b2c3d4e/a.png",  # a harvested batch
             "data/raw/Cyst/added/incoming-9f8e7d6c5b/b.png",                    # another added batch
             "data/raw/Cyst/reviewed-lookalike/added.png",                       # a source folder, not a batch
             "data/raw/Stone/added/reviewed-x/sub/c.png"]
    assert read_by_radiologists(paths, "reviewed").tolist() == [False, True, False, False, True]
