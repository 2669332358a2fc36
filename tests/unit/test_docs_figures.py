"""The figures a user reads first are the committed pipeline outputs': the README's `make run`
output and docs/evaluation.md's headline quote metrics.json, so a new run that changes it fails
here until the docs say what it says now."""

from __future__ import annotations

import json
import re

from helpers.paths import REPO


def metrics() -> dict:
    return json.loads((REPO / "metrics.json").read_text())


def test_the_readmes_evaluate_lines_are_the_committed_metrics():
    m = metrics()
    readme = (REPO / "README.md").read_text()
    ci = m["macro_f1_ci"]
    expected = (f"evaluate: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} [{ci['low']:.3f}, "
                f"{ci['high']:.3f}] over ")
    assert expected in readme, f"README.md's evaluate line is not metrics.json's: expected {expected!r}"
    assert f"ECE {m['ece']:.3f} ({m['ece_calibrated']:.3f} calibrated)" in readme
    recalls = ", ".join(f"{name} {value:.2f}" for name, value in m["recall"].items())
    assert f"recall {recalls}" in readme
    assert (f"prediction sets cover {m['coverage']:.3f} of test slices (target {m['coverage_target']:.2f}), "
            f"mean size {m['mean_set_size']:.2f}; referred {m['referred']:.3f}, accuracy on the rest "
            f"{m['selective_accuracy']:.3f}") in readme


def test_the_evaluation_headline_quotes_the_committed_phantom_figure():
    headline = (REPO / "docs" / "evaluation.md").read_text().split("\n## ", 1)[0]
    quoted = re.search(r"On the phantom the pipeline reaches test macro-F1 (\d\.\d{3})", headline)
    assert quoted is not None, "docs/evaluation.md's headline no longer quotes the phantom's test macro-F1"
    assert quoted.group(1) == f"{metrics()['macro_f1']:.3f}"


def test_the_evaluation_pages_phantom_table_is_the_committed_metrics():
    m = metrics()
    phantom = (REPO / "docs" / "evaluation.md").read_text().split("\n### Phantom\n", 1)[1].split("\n### ", 1)[0]
    ci, recall = m["macro_f1_ci"], m["recall"]
    expected = [
        f"| macro-F1 [95 %] | **{m['macro_f1']:.3f}** [{ci['low']:.3f}, {ci['high']:.3f}] |",
        f"| {m['accuracy']:.3f}; {m['macro_roc_auc_ovr']:.3f} |",
        f"| {', '.join(f'{recall[c]:.2f}' for c in ('Cyst', 'Normal', 'Stone', 'Tumor'))} (Tumor's interval low "
        f"{m['recall_ci_low']['Tumor']:.3f}) |",
        f"(T = {m['temperature']:.2f}) | {m['ece']:.3f} / {m['ece_calibrated']:.3f} |",
        f"| {m['coverage']:.3f}, {m['mean_set_size']:.2f} |",
        f"| {m['referred']:.3f}; {m['selective_accuracy']:.3f} |",
        f"({m['n_test']} slices,",
    ]
    for figure in expected:
        assert figure in phantom, f"docs/evaluation.md's phantom table is not metrics.json's: {figure!r} is missing"


RESULTS = REPO / "docs" / "results"


def real_data_figures() -> dict[str, str]:
    """The kidney-ct-large figures the README and the evaluation headline quote, as they print them,
    from the committed results (grouped 5-fold cross-validation and the levers' ablation)."""
    crossval = json.loads((RESULTS / "kidney-ct-large-cross-export" / "crossval.json").read_text())
    levers = json.loads((RESULTS / "kidney-ct-large-levers" / "ablation.json").read_text())["variants"]
    in_source, cross = crossval["in_source"], crossval["cross_source"]
    probe = levers["lite0_probe_224"]["cross_scores"]
    return {
        "in_source": f"{in_source['macro_f1']:.2f}",
        "in_source_ci": f"[{in_source['macro_f1_ci']['low']:.2f}, {in_source['macro_f1_ci']['high']:.2f}]",
        "thumbnail": f"{crossval['acquisition_baselines']['in_source']['thumbnail']['macro_f1']:.2f}",
        "axial_tumour_recall": f"{in_source['by_orientation']['axial']['recall']['Tumor']:.2f}",
        "cross_export": f"{cross['macro_f1']:.2f}",
        "cross_export_ci": f"[{cross['macro_f1_ci']['low']:.2f}, {cross['macro_f1_ci']['high']:.2f}]",
        "both_exports": f"{levers['both_exports']['cross_scores']['macro_f1']['value']:.2f}",
        "probe_224": f"{probe['macro_f1']['value']:.2f}",
        "probe_224_axial_recall": f"{probe['by_orientation']['axial']['recall']['Tumor']:.2f}",
    }


def test_the_readmes_real_data_figures_are_the_committed_results():
    f = real_data_figures()
    readme = (REPO / "README.md").read_text()
    for quoted in (f"macro-F1 **{f['in_source']}** {f['in_source_ci']}", f"thumbnail ({f['thumbnail']})",
                   f"tumour recall **{f['axial_tumour_recall']}** on axial", f"**{f['cross_export']}** {f['cross_export_ci']}"):
        assert quoted in readme, f"README.md does not say {quoted!r}: the committed results say so"


def test_the_evaluation_headline_quotes_the_committed_real_data_results():
    f = real_data_figures()
    headline = (REPO / "docs" / "evaluation.md").read_text().split("\n## ", 1)[0]
    for quoted in (f"macro-F1 **{f['in_source']}**", f"thumbnail ({f['thumbnail']})", f"(recall {f['axial_tumour_recall']})",
                   f"scores **{f['cross_export']}**", f"both exports ({f['both_exports']})",
                   f"224 px ({f['probe_224']},", f"recall {f['probe_224_axial_recall']})"):
        assert quoted in headline, f"docs/evaluation.md's headline does not say {quoted!r}: the committed results say so"
