"""Process defaults that every entry point applies before TensorFlow is imported.

TensorFlow 2.21 turns its oneDNN kernels on by default only on the CPUs it recognises: on an
AMD EPYC without AVX-512 it leaves them off, and a fit runs at half the speed (156 against 79
img/s, docs/benchmarks.md). Setting ``TF_ENABLE_ONEDNN_OPTS=1`` turns them on everywhere; on CPUs
where they were already on it changes nothing. TensorFlow reads the variable once, when it is
imported, so the CLI, the flows, the service, the benchmarks and the tests call
``apply_cpu_defaults`` first. A value the user set wins (``TF_ENABLE_ONEDNN_OPTS=0`` for
TensorFlow's own default rounding).
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

CPU_DEFAULTS = {
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # TensorFlow's C++ start-up chatter; its errors still show.
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set each of ``CPU_DEFAULTS`` that ``environ`` (the process environment) lacks; return the
    values in force afterwards."""
    environ = os.environ if environ is None else environ
    for name, value in CPU_DEFAULTS.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in CPU_DEFAULTS}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now, for a server this process is about to start (the
    demo's, the benchmarks' and the tests' servers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
