"""A real ``bentoml serve serving.service:TumorScope`` on two tiny registered models, shared by the
service tests (test_service.py, test_service_fuzz.py): started once per test session, on a free
loopback port, stopped at the end of the session.

The project is a copy of the ``prepared_project`` fixture (data stages already ran on the fixture
slices at 32 px). Two models are trained on it (2 epochs, seeds 42 and 7), logged to an SQLite
MLflow store inside the project and registered: version 1 is the champion, version 2 is there for
the reload test. Every path in its params.yaml is absolute, since the server's workers run in the
repository (``--working-dir``), not in the project.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from conftest import REPO

SERVICE = "serving.service:TumorScope"
READY_TIMEOUT_S = 180  # a cold start measured 31-55 s on 2 busy cores; leave room for a slow CI machine
MAX_UPLOAD_BYTES = 256 * 1024  # small, so that "just over the limit" is cheap to send
MAX_BATCH_FILES = 8


@dataclass
class Served:
    url: str
    project: Path
    params_path: Path
    registered_model: str
    versions: dict[int, dict]  # registered version -> train.json
    start_seconds: float
    log_path: Path
    inference_log: Path
    process: subprocess.Popen

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])


_SERVED: Served | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_params(project: Path) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["mlflow"] = {"tracking_uri": f"sqlite:///{project / 'mlflow.db'}", "artifact_root": str(project / "mlartifacts"),
                        "experiment": "serving-test"}
    # max_latency_ms is generous: the dispatcher sheds requests (503) it expects to finish later than
    # this, and a busy 2-core CI machine is slow; batching is proven by batch sizes, not by latency.
    params["serve"] = {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_batch_files": MAX_BATCH_FILES, "max_batch_size": 16,
                       "max_latency_ms": 2000, "inference_log": str(project / "logs" / "inference.jsonl"),
                       "embedding_dims": 8}
    return params


def train_and_register(project: Path) -> dict[int, dict]:
    """Two models trained on the project's cache, registered as versions 1 (champion) and 2."""
    from tumorscope import registry
    from tumorscope.config import load_params, with_overrides
    from tumorscope.stages.training import train_and_save

    here = os.getcwd()
    os.chdir(project)
    try:
        params = load_params("params.yaml")
        versions = {}
        for seed, folder in ((42, "models"), (7, "models-2")):
            train_and_save(with_overrides(params, {"seed": seed}), project / folder, run_name=f"serving-test-{seed}",
                           parent_run_id=None, trained=f"serving test seed {seed}")
            report = json.loads((project / folder / "train.json").read_text())
            version = registry.register(params.promote.registered_model, report["model_uri"], report["run_id"], {})
            versions[int(version.version)] = report
        registry.make_champion(params.promote.registered_model, "1", "serving test")
    finally:
        os.chdir(here)
    return versions


def bentoml_command() -> list[str]:
    script = Path(sys.executable).with_name("bentoml")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bentoml"]


def start(project: Path, versions: dict[int, dict], registered_model: str) -> Served:
    port = free_port()
    params_path = project / "params.yaml"
    log_path = project / "server.log"
    env = os.environ | {"TUMORSCOPE_PARAMS": str(params_path), "BENTOML_HOME": str(project / "bentoml-home"),
                        "BENTOML_DO_NOT_TRACK": "True", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    command = [*bentoml_command(), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port),
               "--working-dir", str(REPO)]
    started = time.monotonic()
    with log_path.open("wb") as log:
        # A session of its own: the server's worker processes are stopped together with it.
        process = subprocess.Popen(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    served = Served(f"http://127.0.0.1:{port}", project, params_path, registered_model, versions, 0.0, log_path,
                    project / "logs" / "inference.jsonl", process)
    wait_ready(served, started)
    served.start_seconds = time.monotonic() - started
    return served


def wait_ready(served: Served, started: float) -> None:
    import httpx

    while time.monotonic() - started < READY_TIMEOUT_S:
        if served.process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {served.process.returncode}:\n{served.log_tail()}")
        try:
            if httpx.get(f"{served.url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(served)
    raise RuntimeError(f"the server was not ready after {READY_TIMEOUT_S} s:\n{served.log_tail()}")


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop(served: Served) -> None:
    """SIGTERM the server (it stops its workers); SIGKILL what is left after 30 s. The workers run in
    process groups of their own (circus), so they are found as the server's children."""
    if served.process.poll() is not None:
        return
    workers = children_of(served.process.pid)
    os.killpg(served.process.pid, signal.SIGTERM)
    try:
        served.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in workers:
            try:
                if "_bentoml_impl.worker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
            except OSError:  # already gone
                pass
        os.killpg(served.process.pid, signal.SIGKILL)
        served.process.wait(timeout=10)


def shared_server(request, prepared_project: Path, tmp_path_factory) -> Served:
    """The session's server, started on first use (a session fixture in each test module calls this)."""
    global _SERVED
    if _SERVED is None:
        project = tmp_path_factory.mktemp("served") / "project"
        shutil.copytree(prepared_project, project)
        params = serve_params(project)
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        versions = train_and_register(project)
        from tumorscope.config import parse_params

        served = start(project, versions, parse_params(params).promote.registered_model)
        print(f"\nbentoml serve ready after {served.start_seconds:.1f} s")
        request.config.add_cleanup(lambda: stop(served))
        _SERVED = served
    return _SERVED


# ---------------------------------------------------------------------------------------------
# Test inputs


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def phantom_pngs(n_per_class: int = 2, size: int = 96) -> dict[str, bytes]:
    """Synthetic kidney CT slices of every class, as PNG files."""
    from tumorscope.config import CANONICAL_CLASSES, WindowConfig
    from tumorscope.data.phantom import image_rng, render_slice

    files = {}
    for label in CANONICAL_CLASSES:
        for k in range(1, n_per_class + 1):
            image, _, _ = render_slice(image_rng(123, label, k), label, size, 12.0, 0.7, WindowConfig())
            files[f"phantom-{label}-{k}.png"] = png_bytes(image)
    return files


def phantom_dicom(label: str = "Tumor", size: int = 96, spacing: tuple[float, float] | None = (0.8, 0.8),
                  pixels: bool = True) -> bytes:
    """A phantom slice as a CT DICOM file in Hounsfield units (stored = HU + 1024)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    from tumorscope.data.phantom import image_rng, render_slice_hu

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("ct.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "CT"
    if pixels:
        hu = render_slice_hu(image_rng(5, label, 1), label, size, 12.0, 0.7).hu
        stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = stored.tobytes()
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
