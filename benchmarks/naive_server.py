"""The naive baseline of benchmarks/bench_serving.py: one request, one `model.predict`.

What a first serving attempt usually looks like: a FastAPI upload route that decodes the file with
the same `tumorscope.inference.prepare_bytes` as the Bento service and calls Keras `model.predict`
on that one image. No batching, no separate model process. Started by the benchmark with uvicorn;
reads the params file named by $TUMORSCOPE_PARAMS and the model by serve.model from the registry.
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, HTTPException, UploadFile

from tumorscope import registry, tracking
from tumorscope.config import load_params
from tumorscope.data.images import UnreadableImage
from tumorscope.inference import prepare_bytes

PARAMS = load_params(os.environ.get("TUMORSCOPE_PARAMS", "params.yaml"))
tracking.configure(PARAMS.mlflow)
MODEL = registry.load_model(PARAMS.promote.registered_model, PARAMS.serve.model)
app = FastAPI()


@app.get("/readyz")
def ready() -> dict:
    return {"ready": True}


@app.post("/classify")
def classify(file: UploadFile) -> dict:
    try:
        prepared = prepare_bytes(file.file.read(), os.path.splitext(file.filename or "")[1], MODEL.spec)
    except UnreadableImage as err:
        raise HTTPException(400, str(err)) from None
    probabilities = np.asarray(MODEL.model.predict(prepared.pixels[np.newaxis], verbose=0))[0]
    return {"class": MODEL.classes[int(probabilities.argmax())],
            "probabilities": dict(zip(MODEL.classes, map(float, probabilities), strict=True)),
            "model_version": MODEL.version}
