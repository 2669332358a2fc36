"""The referral rate over time: the share of answers the model handed to a radiologist, and the
share handed over because the slice was unlike the training data (out of distribution).

A rising referral rate is the earliest warning a team gets: it moves with the first requests from
a new scanner or protocol, before a window is large enough for a distribution test to call drift.
The reference rates are the champion's own on its held-out test slices; a window's rate is called
rising when a one-sided binomial test at the reference rate gives p below ``significance``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

RISING = "rising"
STEADY = "steady"
UNKNOWN = "unknown"


def _rate(frame: pd.DataFrame, column: str) -> tuple[float | None, int]:
    """(share of 1.0 among the known values, how many are known) of a 0/1/NaN column."""
    if column not in frame:
        return None, 0
    known = pd.to_numeric(frame[column], errors="coerce").dropna()
    return (float(known.mean()) if len(known) else None), int(len(known))


def _rise(current: float, n_current: int, reference: float, n_reference: int) -> float:
    """One-sided binomial p-value of ``current`` (a share of ``n_current``) under the reference share."""
    from scipy.stats import binomtest

    # A reference share of 0 or 1 would make any other count impossible or certain: keep it inside (0, 1).
    floor = 0.5 / max(n_reference, 1)
    return float(binomtest(int(round(current * n_current)), n_current, min(max(reference, floor), 1 - floor),
                           alternative="greater").pvalue)


def referral_summary(reference: pd.DataFrame, current: pd.DataFrame, min_window: int,
                     significance: float = 0.01) -> dict:
    """Referral rate and out-of-distribution share of both windows, and whether either rose above
    the reference's (status rising, steady, or unknown with the reason). The OOD share matters on
    its own: a model unsure of most slices refers nearly all of them, and then only the share
    referred as unlike the training data can still rise."""
    reference_rate, n_reference = _rate(reference, "refer")
    reference_ood, _ = _rate(reference, "ood")
    current_rate, n_current = _rate(current, "refer")
    current_ood, _ = _rate(current, "ood")
    summary = {"reference_rate": reference_rate, "reference_ood_share": reference_ood, "n_reference": n_reference,
               "current_rate": current_rate, "current_ood_share": current_ood, "n_current": n_current,
               "significance": significance, "p_value": None, "ood_p_value": None}
    if reference_rate is None or current_rate is None or reference_ood is None or current_ood is None:
        which = "reference" if reference_rate is None or reference_ood is None else "current window"
        return summary | {"status": UNKNOWN, "reason": f"the {which} has no referrals recorded (a model without a "
                                                      "trust state, or rows written before it had one)"}
    if n_current < min_window:
        return summary | {"status": UNKNOWN, "reason": f"{n_current} answers with a referral (< monitor.min_window={min_window})"}
    p_rate = _rise(current_rate, n_current, reference_rate, n_reference)
    p_ood = _rise(current_ood, n_current, reference_ood, n_reference)
    risen = [f"{name} {now:.0%} against {then:.0%} on the test slices (p {p:.2g} < {significance:g})"
             for name, now, then, p in (("referred", current_rate, reference_rate, p_rate),
                                        ("out of distribution", current_ood, reference_ood, p_ood)) if p < significance]
    reason = ("; ".join(risen) if risen else
              f"referred {current_rate:.0%} and out of distribution {current_ood:.0%} of {n_current}, against "
              f"{reference_rate:.0%} and {reference_ood:.0%} on the test slices (p {p_rate:.2g}, {p_ood:.2g} >= {significance:g})")
    return summary | {"status": RISING if risen else STEADY, "p_value": p_rate, "ood_p_value": p_ood, "reason": reason}


def referral_line(summary: dict | None) -> str:
    """'; referred 12% (reference 9%, out of distribution 3%)' for the monitor's one line."""
    if not summary or summary.get("current_rate") is None:
        return ""
    ood = summary.get("current_ood_share")
    reference = summary.get("reference_rate")
    parts = [f"reference {reference:.0%}" if reference is not None and math.isfinite(reference) else None,
             f"out of distribution {ood:.0%}" if ood is not None else None]
    details = ", ".join(p for p in parts if p)
    flag = "REFERRAL RISING: " if summary.get("status") == RISING else ""
    return f"; {flag}referred {summary['current_rate']:.0%}" + (f" ({details})" if details else "")


def referral_metrics(summary: dict | None) -> dict[str, float]:
    """The current window's rates as metrics (logged per check: their history is the trend)."""
    if not summary:
        return {}
    values = {"referral_rate": summary.get("current_rate"), "ood_share": summary.get("current_ood_share"),
              "referral_rising": None if summary.get("status") == UNKNOWN else float(summary.get("status") == RISING)}
    return {k: float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
