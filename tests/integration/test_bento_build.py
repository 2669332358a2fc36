"""`tumorscope bento` builds a Bento that carries the champion: tagged model<version>-data<fingerprint>,
labelled with the model, data and code versions, and served by `bentoml serve <tag>` with no MLflow
registry in reach, answering as the registered model does; its packages are those uv.lock pins."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import yaml

from helpers import bento as bento_server
from helpers.images import phantom_pngs
from helpers.paths import REPO
from helpers.processes import free_port, start, stop
from helpers.requirements import needs_uv, uv_directory

# One session Bento server, on one xdist worker (tests/integration/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bento")]


@needs_uv
def test_built_bento_serves_the_champion_without_the_registry(served, tmp_path):
    home = tmp_path / "bentoml-home"
    env = os.environ | {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "TF_CPP_MIN_LOG_LEVEL": "2",
                        "PATH": f"{uv_directory()}{os.pathsep}{os.environ.get('PATH', '')}"}
    built = subprocess.run([sys.executable, "-m", "tumorscope.cli", "bento", "--params", str(served.params_path)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    match = re.match(r"bento: (tumorscope:model1-data[0-9a-f]{8}-code[0-9a-z]{7}) serves tumorscope-kidney-ct/1 ", built.stdout)
    assert match, built.stdout
    tag = match.group(1)
    info = json.loads(subprocess.run([*bento_server.bentoml_command(), "get", tag, "-o", "json"], env=env | {"COLUMNS": "10000"},
                                     capture_output=True, text=True, timeout=120, check=True).stdout)
    assert info["labels"]["model_version"] == "1" and info["labels"]["registered_model"] == "tumorscope-kidney-ct"
    assert info["labels"]["git_commit"] and "-data" + info["labels"]["dataset_fingerprint"][:8] + "-code" in tag
    carried = [m["tag"] for service in info["services"] for m in service["models"]]
    # The model service declares it: bentoml export and containerize take it along.
    assert len(carried) == 1 and carried[0].startswith("tumorscope-kidney-ct:v1-")

    # The packages are uv.lock's: this Bento and a second build from the same commit carry the same
    # pinned requirements, those of serving/requirements.txt (exported from uv.lock).
    again = subprocess.run([*bento_server.bentoml_command(), "build", "-f", "serving/bentofile.yaml", ".", "--version",
                            "second-build"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    built_requirements = [(home / "bentos" / "tumorscope" / version / "env" / "python" / "requirements.txt").read_text()
                          for version in (tag.split(":")[1], "second-build")]
    assert built_requirements[0] == built_requirements[1]
    locked = (REPO / "serving" / "requirements.txt").read_text()
    assert bento_server.requirement_pins(built_requirements[0]) == bento_server.requirement_pins(locked)

    # No registry in reach: the params the Bento runs with point MLflow at a database that does not exist.
    params = yaml.safe_load(served.params_path.read_text())
    params["mlflow"] |= {"tracking_uri": f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}", "artifact_root": str(tmp_path)}
    params["serve"]["inference_log"] = str(tmp_path / "inference.jsonl")
    params["review"] |= {"queue_dir": str(tmp_path / "review")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    port = free_port()
    process = start([*bento_server.bentoml_command(), "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
                    tmp_path / "bento.log", env | {"TUMORSCOPE_PARAMS": str(tmp_path / "params.yaml")}, cwd=tmp_path)
    bento = bento_server.Served(f"http://127.0.0.1:{port}", tmp_path, tmp_path / "params.yaml", "tumorscope-kidney-ct",
                                {}, 0.0, tmp_path / "bento.log", tmp_path / "inference.jsonl", process)
    try:
        bento_server.wait_ready(bento, time.monotonic())
        name, data = next(iter(phantom_pngs(1).items()))
        upload = {"file": (name, data, "image/png")}
        carried = httpx.post(f"{bento.url}/classify", files=upload, timeout=60).json()
        registered = httpx.post(f"{served.url}/classify", files=upload, timeout=60).json()
        assert carried["model_version"] == registered["model_version"] == "tumorscope-kidney-ct/1"
        np.testing.assert_allclose(list(carried["probabilities"].values()), list(registered["probabilities"].values()),
                                   rtol=1e-5, atol=1e-6)
        # The trust state travels too: the same calibrated answer, set and referral.
        assert carried["calibrated"] and (carried["prediction_set"], carried["refer"], carried["refer_reason"]) == \
            (registered["prediction_set"], registered["refer"], registered["refer_reason"])
        assert not (tmp_path / "absent").exists()  # nothing tried to open the registry
    finally:
        stop(bento.process)


def docker_daemon() -> str | None:
    """Why no Docker daemon can be used here (None: one answers)."""
    import shutil

    if shutil.which("docker") is None:
        return "no docker command"
    try:
        answer = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                                timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer in 30 s"
    return None if answer.returncode == 0 else f"docker info: {(answer.stderr or answer.stdout).strip()[:200]}"


@needs_uv
def test_the_bento_containerizes(tmp_path):
    """`bentoml containerize` on a Bento of this commit (an OCI image with the locked packages). It
    needs a Docker daemon and the package registries, which a CI runner or a laptop may not offer:
    without a daemon the test skips and says why (a daemon that answers and then fails, fails)."""
    why_not = docker_daemon()
    if why_not:
        pytest.skip(f"bentoml containerize needs a reachable Docker daemon ({why_not})")
    env = os.environ | {"BENTOML_HOME": str(tmp_path / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "True",
                        "PATH": f"{uv_directory()}{os.pathsep}{os.environ.get('PATH', '')}"}
    bentoml = bento_server.bentoml_command()
    subprocess.run([*bentoml, "build", "-f", "serving/bentofile.yaml", ".", "--version", "containerize-test"], cwd=REPO,
                   env=env, check=True, capture_output=True, timeout=600)
    image = "tumorscope-containerize-test:latest"
    done = subprocess.run([*bentoml, "containerize", "tumorscope:containerize-test", "-t", image], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    try:
        inspected = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True, timeout=60)
        assert inspected.returncode == 0 and json.loads(inspected.stdout)[0]["Config"]
    finally:
        subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, timeout=120)
