"""Drift alerts: a JSON POST to a webhook URL, or a Prefect notification block (Slack, Teams,
e-mail, ... configured once in Prefect), both from monitor.* params."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tumorscope.errors import UserError


def alert_payload(line: str, summary: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a receiver gets: the one-line verdict as ``text`` (what Slack-style webhooks display) and
    the fields a program needs."""
    return {"text": line, "status": summary.get("status"), "drift": summary.get("drift"),
            "model_version": summary.get("model_version"), "current": summary.get("current"),
            "reason": summary.get("reason"), "drifted_features": summary.get("drifted_features", []),
            "embedding": summary.get("embedding"), **(extra or {})}


def post_webhook(url: str, payload: dict[str, Any], timeout: float = 10.0) -> int:
    """POST ``payload`` as JSON; returns the HTTP status. A refused connection or an error status is
    one line naming the URL."""
    if not url.startswith(("http://", "https://")):
        raise UserError(f"monitor.webhook_url must be an http(s) URL, got {url!r}")
    request = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        raise UserError(f"drift alert to {url} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"drift alert to {url} failed: {reason}") from None


def notify_block(name: str, subject: str, body: str) -> None:
    """Send through a saved Prefect notification block, named ``<block-type>/<name>`` (e.g.
    ``slack-webhook/radiology-ml``)."""
    from prefect.blocks.core import Block

    try:
        block = Block.load(name)
    except (ValueError, KeyError) as err:
        raise UserError(f"monitor.notification_block {name!r} not found in Prefect: {err}") from None
    if not hasattr(block, "notify"):
        raise UserError(f"monitor.notification_block {name!r} is not a notification block")
    block.notify(body=body, subject=subject)
