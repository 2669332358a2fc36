"""tumorscope: MLOps pipeline for kidney CT slice classification."""

__version__ = "0.1.0"
