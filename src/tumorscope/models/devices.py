"""The device a model trains on: CPU or GPU, the precision and the data-parallel distribution
that follow it, and a clean Keras session per model."""

from __future__ import annotations

import numpy as np


def device_batch_size(batch_size: int, gpu_batch_multiplier: int, device: str) -> int:
    """The batch size to train with on ``device`` ('cpu' or 'gpu')."""
    return batch_size * gpu_batch_multiplier if device == "gpu" else batch_size



def accelerator() -> str:
    """'gpu' when the active Keras backend sees a GPU, else 'cpu' (backend-agnostic)."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return "gpu" if any(d.platform == "gpu" for d in jax.devices()) else "cpu"
        if backend == "tensorflow":
            import tensorflow as tf

            return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
        if backend == "torch":
            import torch

            return "gpu" if torch.cuda.is_available() else "cpu"
    except Exception:  # a broken CUDA install: train on CPU rather than fail
        return "cpu"
    return "cpu"



def fresh_session() -> None:
    """Drop the previous model's Keras global state before the next trial or fold builds one.
    The full Python garbage collection that clear_session runs by default took 0.36 s of a
    trial's ~0.67 s overhead on CPU (cProfile, benchmarks/bench_tuning.py settings), so it runs
    only on a GPU, whose memory Python's own collector cannot see filling up."""
    import keras

    keras.backend.clear_session(free_memory=accelerator() == "gpu")



def precision_policy(mode: str) -> str:
    """The Keras dtype policy train.precision means on this device ("auto": mixed_float16 on a GPU)."""
    return ("mixed_float16" if accelerator() == "gpu" else "float32") if mode == "auto" else mode



def data_parallel(setting: str):
    """train.distribution as a Keras distribution: DataParallel over every local device when
    ``setting`` is "auto", the backend is JAX and it sees more than one device (GPUs, or CPU devices
    XLA was told to pretend: --xla_force_host_platform_device_count); else None (one device)."""
    import keras

    if setting == "none" or keras.backend.backend() != "jax":
        return None
    devices = keras.distribution.list_devices()
    return keras.distribution.DataParallel(devices=devices) if len(devices) > 1 else None



def data_parallel_devices() -> int:
    """How many devices the active Keras distribution splits each batch across (1 without one)."""
    import keras

    distribution = keras.distribution.distribution()
    return int(np.prod(distribution.device_mesh.shape)) if distribution is not None else 1



def set_precision(mode: str) -> str:
    """Apply train.precision as the global Keras dtype policy (before building a model)."""
    import keras

    policy = precision_policy(mode)
    keras.config.set_dtype_policy(policy)
    return policy
