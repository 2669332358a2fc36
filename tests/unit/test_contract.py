"""The service's typed contract without a server: the answer models take what the service builds
and refuse what they do not describe; the OpenAPI document is completed as a client needs it (the
served document against real answers: tests/integration/test_service.py)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from tumorscope.api import contract, openapi
from tumorscope.models.explain import region_of_interest


def test_an_answer_with_an_undocumented_field_is_refused():
    body = {"reloaded": True, "changed": False, "model_version": "m/1", "error": None}
    assert contract.answer(contract.ReloadOutcome, body).model_dump() == body | {"previous_version": None}
    with pytest.raises(ValidationError, match="extra"):
        contract.answer(contract.ReloadOutcome, body | {"secret": 1})


@pytest.mark.parametrize("original_shape", [None, (512, 512)])
@pytest.mark.parametrize("hot", [True, False])
def test_every_region_the_explainer_gives_fits_the_contract(original_shape, hot: bool):
    heat = np.zeros((32, 32), np.float32)
    if hot:
        heat[4:10, 20:30] = 1.0
    region = region_of_interest(heat, pixel_spacing_mm=(0.7, 0.7), original_shape=original_shape)
    assert contract.Region.model_validate(region).model_dump(exclude_unset=True) == region


def test_the_class_field_keeps_its_name_on_the_wire():
    item = contract.BatchFailure(index=0, filename="a.png", error="corrupt", status=422)
    assert item.model_dump() == {"index": 0, "filename": "a.png", "ok": False, "error": "corrupt", "status": 422}
    assert "class" in contract.Classification.model_json_schema()["properties"]


def test_refusal_is_the_error_body_with_its_status():
    response = contract.refusal(415, {"error": "unsupported content type", "status": 415})
    assert response.status_code == 415 and response.body == b'{"error":"unsupported content type","status":415}'


def bentoml_like_spec() -> dict:
    """The shape BentoML 1.4 gives: a flattened answer schema titled after its component."""
    flattened = {"type": "object", "title": "HealthIODescriptor", "properties": {"model_version": {"type": "string"}}}
    component = {"type": "object", "title": "HealthIODescriptor",
                 "properties": {"model_version": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    post = {"operationId": "health", "requestBody": {"content": {}},
            "responses": {"200": {"content": {"application/json": {"schema": flattened}}}}}
    return {"paths": {"/health": {"post": post}, "/classify": {"post": {"responses": {}}}},
            "components": {"schemas": {"HealthIODescriptor": component}}}


def test_the_document_gets_full_answers_error_bodies_and_gets():
    spec = bentoml_like_spec()
    done = openapi.documented(spec, {"/health": (400, 415), "/missing": (400,)}, ("/health",), keys_enabled=False)
    post = done["paths"]["/health"]["post"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HealthIODescriptor"}
    assert set(post["responses"]) == {"200", "400", "415"}
    assert post["responses"]["415"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    get = done["paths"]["/health"]["get"]
    assert "requestBody" not in get and get["operationId"] == "health_get" and get["responses"] == post["responses"]
    assert "securitySchemes" not in done["components"] and "security" not in post
    assert set(done["components"]["schemas"]["ErrorBody"]["required"]) == {"error", "status"}
    assert spec == bentoml_like_spec()  # the input is left alone


def test_with_keys_the_document_says_how_to_send_them():
    done = openapi.documented(bentoml_like_spec(), {"/health": (400,)}, (), keys_enabled=True)
    post = done["paths"]["/health"]["post"]
    assert post["security"] == [{"bearer": []}, {"apiKey": []}] and "401" in post["responses"]
    assert done["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
