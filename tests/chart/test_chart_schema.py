"""values.schema.json: draft-07, closed on the chart's own objects, every key described, and the
refusals a schema gives before any template runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support.helm import CHART_DIR, render_error

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


def _objects(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node that declares properties (the chart's own objects)."""
    if isinstance(node, dict):
        if "properties" in node:
            yield where, node
        for key, value in node.items():
            yield from _objects(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{where}/{i}")


def test_draft_07_closed_and_described() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    objects = list(_objects(SCHEMA))
    assert len(objects) > 20
    for where, node in objects:
        assert node.get("additionalProperties") is False, where
        for key, prop in node["properties"].items():
            assert "description" in prop or "$ref" in prop, f"{where}/{key}"


def test_values_yaml_keys_are_all_in_the_schema() -> None:
    def keys(values: dict[str, Any], schema: dict[str, Any], where: str) -> None:
        if "$ref" in schema:
            schema = SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[1]]
        for key, value in values.items():
            if "properties" in schema:
                assert key in schema["properties"], f"{where}.{key}"
                sub = schema["properties"][key]
            else:
                sub = schema.get("additionalProperties", {})
                sub = next((s for s in sub.get("oneOf", [sub]) if "$ref" in s), sub)
            if isinstance(value, dict) and value:
                keys(value, sub, f"{where}.{key}")

    keys(yaml.safe_load((CHART_DIR / "values.yaml").read_text()), SCHEMA, "")


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"workers": {"Bad_Name": {"app": "p:a"}}}, "Bad_Name"),
        ({"workers": {"default": {"app": "p:a", "queues": ["a,b"]}}}, "/workers/default"),
        ({"timing": {"releaseMargin": 0}}, "/timing/releaseMargin"),
        ({"timing": {"heartbeatInterval": 0.01}}, "/timing/heartbeatInterval"),
        ({"timing": {"visibilityTimeout": 0.5}}, "/timing/visibilityTimeout"),
        ({"timing": {"leaseDuration": 10}}, "leaseDuration"),  # the scheduler's key only
        ({"scheduler": {"timing": {"retryPeriod": 0.01}}}, "/scheduler/timing/retryPeriod"),
        ({"probes": {"livenessTimeout": 1}}, "/probes/livenessTimeout"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"workers": {"default": {"app": "p:a", "keda": {"trigger": "cpu"}}}}, "trigger"),
    ],
)
def test_the_schema_refuses(values: dict[str, Any], where: str) -> None:
    message = render_error({"workers": {"default": {"app": "p:a"}}, **values})
    assert "schema" in message
    assert where in message
