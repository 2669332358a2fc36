"""Label Studio's formats, for teams that read slices there instead of on the clinician page:
``export_tasks`` writes the queue's pending items as Label Studio tasks (each slice as a data URI,
the model's answer as a prediction, so the reader sees it pre-selected) and the labelling config
of a project with one Choices control; ``import_annotations`` reads Label Studio's JSON export
(full, or JSON-MIN) back into the queue as readings by the annotator.
"""

from __future__ import annotations

import base64
from typing import Any
from xml.sax.saxutils import quoteattr

from tumorscope.errors import UserError
from tumorscope.review.queue import CANNOT_ASSESS, BadLabel, ReviewQueue, UnknownItem

FROM_NAME, TO_NAME = "class", "image"


def label_config(classes: list[str]) -> str:
    """The project's labelling interface: the slice and one choice among the classes or 'cannot assess'."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in (*classes, CANNOT_ASSESS))
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n{choices}\n'
            f'  </Choices>\n</View>\n')


def export_tasks(queue: ReviewQueue, status: str = "pending") -> list[dict[str, Any]]:
    """Label Studio tasks of the queue's items (``status`` as ``ReviewQueue.items``)."""
    tasks = []
    for item in queue.items(status):
        png = queue.slice_png(item.id)
        answer = item.record["answer"]
        task: dict[str, Any] = {"data": {"image": "data:image/png;base64," + base64.b64encode(png).decode(),
                                         "item": item.id, "why_queued": item.record["why"],
                                         "refer_reason": answer.get("refer_reason"),
                                         "model_version": item.record["model_version"]}}
        if answer.get("class"):
            task["predictions"] = [{"model_version": item.record["model_version"],
                                    "score": float((answer.get("probabilities") or {}).get(answer["class"], 0.0)),
                                    "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                                "value": {"choices": [answer["class"]]}}]}]
        tasks.append(task)
    return tasks


def readings_of(export: Any) -> list[dict[str, Any]]:
    """(item, label, annotator, cancelled) of every annotation in a Label Studio JSON or JSON-MIN export."""
    if not isinstance(export, list):
        raise UserError("not a Label Studio export: expected a JSON list of tasks")
    readings = []
    for index, task in enumerate(export):
        if not isinstance(task, dict):
            raise UserError(f"not a Label Studio export: task {index} is not an object")
        if "annotations" in task:  # the full JSON export
            item = (task.get("data") or {}).get("item")
            for annotation in task["annotations"] or []:
                choices = [r["value"].get("choices", []) for r in annotation.get("result", [])
                           if r.get("from_name") == FROM_NAME and isinstance(r.get("value"), dict)]
                readings.append({"item": item, "label": choices[0][0] if choices and choices[0] else None,
                                 "annotator": _annotator(annotation.get("completed_by")),
                                 "cancelled": bool(annotation.get("was_cancelled"))})
        else:  # JSON-MIN: one flat object per annotation, the control's name as the key
            label = task.get(FROM_NAME)
            readings.append({"item": task.get("item"), "label": label[0] if isinstance(label, list) else label,
                             "annotator": _annotator(task.get("annotator")), "cancelled": False})
    return readings


def import_annotations(queue: ReviewQueue, export: Any) -> dict[str, Any]:
    """Apply a Label Studio export's readings to the queue (each a new line in the item's history,
    by ``label-studio:<annotator>``). Every annotation is accounted for: applied, skipped (cancelled
    or without a choice) or refused (an unknown item or class), with the reason."""
    outcome: dict[str, Any] = {"applied": 0, "skipped": 0, "refused": []}
    for reading in readings_of(export):
        if reading["cancelled"] or reading["label"] is None:
            outcome["skipped"] += 1
            continue
        try:
            queue.label(str(reading["item"]), reading["label"], f"label-studio:{reading['annotator']}")
            outcome["applied"] += 1
        except (UnknownItem, BadLabel) as err:
            outcome["refused"].append(str(err))
    return outcome


def _annotator(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("email") or value.get("id") or "unknown")
    return "unknown" if value is None else str(value)
