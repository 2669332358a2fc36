import pytest
import yaml

from helpers.params import params_with, section
from helpers.paths import REPO
from tumorscope.config import ConfigError, load_params


def test_a_missing_setting_is_named(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["train"]["lr"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="params.yaml has no 'train.lr'") as err:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"architecture": "resnet9000"}}, "train.architecture"),
        ({"split": {"train": 0.8, "val": 0.15, "test": 0.15}}, "split"),
        ({"preprocess": {"image_size": "big"}}, "preprocess.image_size"),
        ({"train": {"epochz": 3}}, "train.epochz"),
        ({"phantom": {"proportions": {"Melanoma": 1}}}, "phantom.proportions"),
        ({"train": {"gpu_batch_multiplier": 0}}, "train.gpu_batch_multiplier"),
        ({"evaluate": {"distance_bands": [4, 64]}}, "evaluate.distance_bands"),
        ({"train": {"ensemble_members": 0}}, "train.ensemble_members"),
        ({"ablation": {"variants": {"baseline": {}, "seeds": {"train": {"ensemble_members": 2}}}}}, "ablation"),
    ],
)
def test_invalid_value_names_its_key(raw, key):
    with pytest.raises(ConfigError) as err:
        params_with(raw)
    assert f"'{key}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_validate_section_alias():
    assert params_with({"validate": {"min_images_per_class": 3}}).validate_.min_images_per_class == 3


def test_relative_sqlite_uris_become_absolute(tmp_path, monkeypatch):
    from tumorscope.tracking import absolute_sqlite_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_sqlite_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for unchanged in ("sqlite:////abs/m.db", "postgresql://u@h/db", "http://127.0.0.1:5000", "sqlite:///:memory:"):
        assert absolute_sqlite_uri(unchanged) == unchanged


def test_mlflow_server_command_takes_its_stores_from_params(tmp_path, monkeypatch):
    from tumorscope.config import MlflowConfig, MlflowServerConfig
    from tumorscope.tracking import server_command

    monkeypatch.chdir(tmp_path)

    def option(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    # The embedded default: the server serves the project's own SQLite file, artefacts from mlartifacts.
    embedded = server_command(section(MlflowConfig))
    assert option(embedded, "--backend-store-uri") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert option(embedded, "--artifacts-destination") == (tmp_path / "mlartifacts").as_uri()
    assert "--serve-artifacts" in embedded and option(embedded, "--host") == "127.0.0.1"
    assert "--allowed-hosts" not in embedded
    # A team's database named by tracking_uri is the server's backend.
    team = server_command(section(MlflowConfig, tracking_uri="postgresql://u@db/mlflow"))
    assert option(team, "--backend-store-uri") == "postgresql://u@db/mlflow"
    # Clients pointed at the server: the backend and artefacts come from mlflow.server.
    client_side = section(MlflowConfig, tracking_uri="http://mlflow.lan:5000", server=section(MlflowServerConfig,
        host="0.0.0.0", port=5001, backend_store_uri="postgresql://u@db/m", artifacts_destination="s3://bucket/ml",
        allowed_hosts="mlflow.lan"))
    command = server_command(client_side, "/opt/mlflow")
    assert command[:2] == ["/opt/mlflow", "server"]
    assert option(command, "--backend-store-uri") == "postgresql://u@db/m"
    assert option(command, "--artifacts-destination") == "s3://bucket/ml"
    assert (option(command, "--host"), option(command, "--port"), option(command, "--allowed-hosts")) == (
        "0.0.0.0", "5001", "mlflow.lan")
    assert option(server_command(section(MlflowConfig, tracking_uri="http://x:1")), "--backend-store-uri").endswith("/mlflow.db")


def test_local_artefacts_through_a_server_are_refused():
    from tumorscope.config import MlflowConfig
    from tumorscope.errors import UserError
    from tumorscope.tracking import _check_artifact_location

    _check_artifact_location(section(MlflowConfig), "file:///project/mlartifacts/1")  # embedded: fine
    _check_artifact_location(section(MlflowConfig, tracking_uri="http://h:5000"), "mlflow-artifacts:/1")
    with pytest.raises(UserError, match="only one host can read"):
        _check_artifact_location(section(MlflowConfig, tracking_uri="http://h:5000"), "file:///project/mlartifacts/1")


@pytest.mark.parametrize(("device", "multiplier", "expected"), [("cpu", 4, 32), ("gpu", 4, 128), ("gpu", 1, 32)])
def test_batch_size_scales_only_on_a_gpu(device, multiplier, expected):
    from tumorscope.models.devices import device_batch_size

    assert device_batch_size(32, multiplier, device) == expected
