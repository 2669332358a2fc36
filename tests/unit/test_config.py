import pytest

from helpers.paths import REPO
from tumorscope.config import ConfigError, Params, load_params, parse_params


def test_repo_params_yaml_is_valid_and_matches_defaults():
    assert load_params(REPO / "params.yaml") == Params()


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
    ],
)
def test_invalid_value_names_its_key(raw, key):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert f"'{key}'" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_validate_section_alias():
    assert parse_params({"validate": {"min_images_per_class": 3}}).validate_.min_images_per_class == 3


def test_relative_sqlite_uris_become_absolute(tmp_path, monkeypatch):
    from tumorscope.tracking import absolute_sqlite_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_sqlite_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for unchanged in ("sqlite:////abs/m.db", "postgresql://u@h/db", "http://127.0.0.1:5000", "sqlite:///:memory:"):
        assert absolute_sqlite_uri(unchanged) == unchanged


@pytest.mark.parametrize(("device", "multiplier", "expected"), [("cpu", 4, 32), ("gpu", 4, 128), ("gpu", 1, 32)])
def test_batch_size_scales_only_on_a_gpu(device, multiplier, expected):
    from tumorscope.models.train import device_batch_size

    assert device_batch_size(32, multiplier, device) == expected
