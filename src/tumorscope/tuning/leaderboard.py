"""The leaderboard of a study: finished trials ranked by the lower bound of their validation
interval, the best parameters the train stage reads, the markdown table and the study's plots."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tumorscope.config import Params
from tumorscope.errors import UserError
from tumorscope.reports import read_json, write_json
from tumorscope.tuning.study import StudyHandle, count_states, load_study, redact

log = logging.getLogger(__name__)


def ranking_key(scores: dict, metric: str) -> float:
    """The lower bound of the metric's group-bootstrap interval (point value if undefined)."""
    interval = scores[f"{metric}_ci"] if scores.get(metric) is not None else scores["macro_f1_ci"]
    point = scores[metric] if scores.get(metric) is not None else scores["macro_f1"]
    return interval["low"] if interval and interval["low"] is not None else point


def leaderboard(study, metric: str) -> list[dict]:
    """Complete trials, feasible first, ranked by the lower interval bound of the metric."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=None):
        if trial.state.name != "COMPLETE" or "scores" not in trial.user_attrs:
            continue
        scores = trial.user_attrs["scores"]
        rows.append({
            "trial": trial.number, "architecture": trial.user_attrs.get("architecture"),
            "feasible": bool(trial.user_attrs.get("feasible", True)),
            "infeasible_because": trial.user_attrs.get("infeasible_because"),
            "rank_by": ranking_key(scores, metric), "value": trial.value, "params": dict(trial.params),
            "scores": scores, "epochs_run": trial.user_attrs.get("epochs_run"),
        })  # run ids and times stay in MLflow and Optuna: this table is a DVC output that must repeat
    # Feasible first; among the rest a collapsed model comes last, whatever its score.
    rows.sort(key=lambda row: (not row["feasible"], bool(row["scores"].get("degenerate")), -row["rank_by"],
                               row["trial"]))
    return rows


def leaderboard_markdown(rows: list[dict], metric: str, counts: dict[str, int]) -> str:
    lines = [f"Ranked by the lower bound of the {metric} interval (bootstrap over duplicate groups, validation split).",
             "", "| rank | trial | architecture | macro-F1 [interval] | critical recall [interval] | feasible | params |",
             "|---:|---:|---|---|---|---|---|"]
    for rank, row in enumerate(rows, 1):
        s = row["scores"]
        f1 = f"{s['macro_f1']:.3f} [{_fmt(s['macro_f1_ci']['low'])}, {_fmt(s['macro_f1_ci']['high'])}]"
        rec = (f"{s['critical_recall']:.3f} [{_fmt(s['critical_recall_ci']['low'])}, {_fmt(s['critical_recall_ci']['high'])}]"
               if s["critical_recall"] is not None else "n/a")
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in row["params"].items())
        lines.append(f"| {rank} | {row['trial']} | {row['architecture']} | {f1} | {rec} | {row['feasible']} | {shown} |")
    lines += ["", "Trial states: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def best_train_overrides(row: dict) -> dict:
    """The winning trial's train settings (what the train stage applies over params.train)."""
    return dict(row["params"])


def finish_study(params: Params, handle: StudyHandle) -> dict:
    """Leaderboard, best params and Optuna plots: written to reports/ and the MLflow parent run."""
    import mlflow

    from tumorscope.models.evaluate import flat_scores

    study = load_study(params)
    counts = count_states(study)
    rows = leaderboard(study, params.tune.metric)
    markdown = leaderboard_markdown(rows, params.tune.metric, counts)
    cfg = params.tune
    if not rows:
        raise UserError(f"tune: no trial of study {study.study_name!r} completed (states {counts}); "
                        f"see the failed runs under MLflow run {handle.parent_run_id}")
    best = rows[0]  # feasible trials rank first
    warning = None
    if not best["feasible"]:
        # Still train the best there is (the evaluation and its recall are what a reviewer needs to
        # see); say loudly that the constraint was missed. Promotion gates are the hard stop.
        warning = (f"WARNING: no feasible trial ({params.evaluate.critical_class} recall >= "
                   f"{cfg.min_critical_recall}, tune.min_critical_recall, and predictions not all one class); "
                   f"using the best infeasible trial {best['trial']}: {best['infeasible_because']}")
        markdown = f"**{warning}**\n\n{markdown}"
        log.warning("tune: %s", warning)
    summary = {"study_name": study.study_name, "storage": redact(cfg.storage), "metric": cfg.metric,
               "states": counts, "best": best, "warning": warning, "leaderboard": rows}
    write_json(cfg.leaderboard_path, summary)
    Path(cfg.leaderboard_path).with_suffix(".md").write_text(markdown + "\n")
    write_json(cfg.best_params_path, {"study_name": study.study_name, "trial": best["trial"],
                                      "train": best_train_overrides(best)})
    plots = write_study_plots(study, Path(cfg.plots_dir))
    with mlflow.start_run(run_id=handle.parent_run_id):
        mlflow.log_metrics({"best_trial": best["trial"], **flat_scores(best["scores"], "best_val_"),
                            **{f"trials_{k.lower()}": v for k, v in counts.items()}})
        mlflow.log_artifact(cfg.leaderboard_path)
        mlflow.log_artifact(str(Path(cfg.leaderboard_path).with_suffix(".md")))
        for plot in plots:
            mlflow.log_artifact(str(plot), artifact_path="optuna")
    summary["markdown"] = markdown
    summary["parent_run_id"] = handle.parent_run_id
    return summary


def fixed_configuration(params: Params) -> dict:
    """tune.n_trials 0: no study. The stage's outputs say so, and the best params are params.yaml's
    own values of the searched settings (a retraining gives the champion's there)."""
    cfg = params.tune
    train = {name: getattr(params.train, name) for name in cfg.search_space}
    note = "tune.n_trials is 0: no study; the configuration is params.yaml's train.*"
    summary: dict[str, Any] = {"study_name": None, "storage": redact(cfg.storage), "metric": cfg.metric, "states": {},
               "best": {"trial": None, "architecture": params.train.architecture, "params": train},
               "warning": None, "leaderboard": [], "note": note}
    write_json(cfg.leaderboard_path, summary)
    Path(cfg.leaderboard_path).with_suffix(".md").write_text(f"{note}: {train}\n")
    write_json(cfg.best_params_path, {"study_name": None, "trial": None, "train": train})
    Path(cfg.plots_dir).mkdir(parents=True, exist_ok=True)
    return summary | {"markdown": note, "parent_run_id": None}


def write_study_plots(study, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances (matplotlib, no plotly needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots: list[tuple[str, Callable[[Any], Any]]] = [("optimization_history.png", vis.plot_optimization_history)]
    # Importances need at least two complete trials and a parameter that varied.
    if len(complete) >= 2 and any(len({str(t.params.get(p)) for t in complete}) > 1 for p in complete[0].params):
        plots.append(("param_importances.png", vis.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances of a constant column
                log.info("tune: skipped %s: %s", name, err)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=110)
        plt.close(figure)
        written.append(out_dir / name)
    return written


def read_best_params(params: Params) -> dict:
    path = Path(params.tune.best_params_path)
    if not path.is_file():
        raise UserError(f"{path} not found (run the tune stage first)")
    return read_json(path)
