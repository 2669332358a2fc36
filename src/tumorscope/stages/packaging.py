"""Package the served model: a Bento of the service with the champion inside (``tumorscope bento``)."""

from __future__ import annotations

from pathlib import Path

from tumorscope.config import Params
from tumorscope.errors import UserError


def run_bento(params: Params, bentofile: Path = Path("serving/bentofile.yaml")) -> str:
    """Build a Bento of the service with serve.model (the champion) inside it, tagged
    model<version>-data<fingerprint>-code<commit> and labelled with the model, data and code versions
    (the model's training commit, and the commit of the service code built)."""
    import mlflow

    from tumorscope import registry, tracking
    from tumorscope.api import packaging as bento

    name, ref = params.promote.registered_model, params.serve.model
    if ":/" in ref:
        raise UserError(f"serve.model is {ref!r}: a Bento is built from a registered version or alias")
    tracking.configure(params.mlflow)
    client = mlflow.MlflowClient()
    version = registry.get_version(client, name, ref)
    tags = client.get_run(version.run_id).data.tags
    fingerprint = tags.get("dataset_fingerprint", "unknown")
    labels = {"registered_model": name, "model_version": str(version.version), "dataset_fingerprint": fingerprint,
              "dvc_raw_md5": tags.get("dvc_raw_md5", "unknown"), "git_commit": tags.get("git_commit", "unknown")}
    loaded = registry.load_model(name, str(version.version))
    model_tag = bento.save_to_store(loaded, bento.store_name(name), bento.store_version(version.version, version.run_id),
                                    labels)
    code = tracking.git_commit()
    bento_tag = bento.build(bentofile, model_tag, bento.bento_version(version.version, fingerprint, code),
                            labels | {"service_git_commit": code})
    return (f"bento: {bento_tag} serves {name}/{version.version} (data {fingerprint}, model {model_tag}); "
            f"run it: bentoml serve {bento_tag}; image: bentoml containerize {bento_tag}")
