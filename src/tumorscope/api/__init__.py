"""What the Bento service does, as plain functions and classes (``serving/service.py`` is a thin
BentoML shell around them, so that all of it is testable without a server).

Two halves, matching the service's two processes:

* the API side checks an upload (``upload_guard.UploadGuard`` at the ASGI level, then
  ``refusals.prepare_upload`` per file), prepares it exactly as training did
  (``inference.prepare_bytes``), turns the model's answer into a response
  (``responses.classify_response``) and appends a line to the inference log
  (``inference_log.InferenceLog``: a background writer that never blocks or fails a request);
* the model side (``served_model.ServedModel``) holds the loaded classifier, answers batches with
  probabilities and an embedding summary, explains one slice with Grad-CAM, and reloads when the
  registry alias moves.

Every refusal is a ``refusals.BadRequest`` with an HTTP status and a one-line message: 400 for a
malformed request, 413 for too much data, 415 for a content type that is not an image, 422 for a
file that arrived intact but is not a usable CT slice. ``settings`` finds the service's params.
"""
