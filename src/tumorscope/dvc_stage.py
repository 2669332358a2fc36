"""`python -m tumorscope.dvc_stage <stage>`: what each dvc.yaml stage runs, and nothing else.

The CLI's `tumorscope <stage>` calls the same functions. DVC stages run this module rather than
the CLI so that a stage depends on the code that can change its outputs only: a help string or a
new command in the CLI does not rerun the study and the training.

Heavy libraries are imported inside the stage functions. A user mistake prints one line and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from tumorscope.config import Params


def run_reported(work: Callable[[], str]) -> int:
    """Run one command; print its summary and return 0, or print a user mistake as one red line
    on stderr and return 1."""
    from tumorscope.errors import UserError
    from tumorscope.runtime import apply_cpu_defaults

    # Before any stage imports TensorFlow: oneDNN on, its chatter off (tumorscope.runtime).
    apply_cpu_defaults()
    log_to_stderr()
    try:
        print(work(), flush=True)
    except UserError as err:
        print(f"\033[31merror: {err}\033[0m" if sys.stderr.isatty() else f"error: {err}", file=sys.stderr)
        return 1
    return 0


def log_to_stderr() -> None:
    """The library's log records (warnings such as "no feasible trial") as plain lines on stderr."""
    import logging

    logger = logging.getLogger("tumorscope")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _data_stage(name: str) -> Callable[[Params], str]:
    def run(params: Params) -> str:
        from tumorscope.stages import data

        return getattr(data, f"run_{name}")(params)

    run.__name__ = name
    return run


phantom, ingest, manifest, validate, split, preprocess, incoming = map(
    _data_stage, ["phantom", "ingest", "manifest", "validate", "split", "preprocess", "incoming"])


def audit(params: Params) -> str:
    from tumorscope.stages.audit import run_audit

    return run_audit(params)


def tune(params: Params, params_path: Path) -> str:
    # The tuning flow reads params.yaml itself: its deployment runs on other hosts from that path.
    from flows.tuning import run_in_process, summary_line

    return summary_line(run_in_process(str(params_path)))


def train(params: Params, baseline: bool = False) -> str:
    from tumorscope.stages import training

    return training.run_train(params, baseline=baseline)


def evaluate(params: Params) -> str:
    from tumorscope.stages import training

    return training.run_evaluate(params)


def promote(params: Params) -> str:
    from tumorscope.stages import promotion

    return promotion.run_promote(params)


def monitor(params: Params, current: str | None = None) -> str:
    from tumorscope.stages import monitoring

    return monitoring.run_monitor(params, current)[0]


STAGES: dict[str, Callable[..., str]] = {
    stage.__name__: stage for stage in (phantom, ingest, manifest, validate, split, preprocess, audit, tune, train,
                                         evaluate, promote, incoming, monitor)}


def run_stage(name: str, params_path: Path) -> str:
    """Load params and run one stage (the tune stage also hands its flow the params file)."""
    from tumorscope.config import load_params

    params = load_params(params_path)
    return tune(params, params_path) if name == "tune" else STAGES[name](params)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in STAGES or len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--params"):
        print(f"usage: python -m tumorscope.dvc_stage {{{','.join(STAGES)}}} [--params params.yaml]", file=sys.stderr)
        return 2
    params_path = Path(args[2]) if len(args) == 3 else Path("params.yaml")
    return run_reported(lambda: run_stage(args[0], params_path))


if __name__ == "__main__":
    sys.exit(main())
