"""Data stages: phantom, ingest, manifest, validate, split, preprocess, cache."""
