"""Validate custom resources (KEDA ScaledObject, Prometheus Operator monitors and rules) offline.

kubernetes-validate knows only the built-in kinds; these are checked against the upstream CRDs'
``openAPIV3Schema`` vendored in ``tests/support/crd_schemas/``, read the way the API server reads
a structural schema: an object's unknown fields are refused (strict field validation) unless it
declares ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``; int-or-string,
``nullable``, list types (set, map) and ObjectMeta are honoured; each CEL rule
(``x-kubernetes-validations``) must have its Python equivalent in ``CEL_RULES``, so a refreshed
schema with a new rule fails loudly instead of passing unchecked.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from jsonschema import Draft7Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError

__all__ = (
    "CEL_RULES",
    "CRD_GROUPS",
    "CRD_SCHEMA_DIR",
    "crd_schema",
    "is_crd_kind",
    "validate_crd",
    "vendored_kinds",
)

CRD_SCHEMA_DIR: Final = Path(__file__).parent / "crd_schemas"

#: The API groups whose kinds are validated here (never by kubernetes-validate).
CRD_GROUPS: Final = frozenset({"keda.sh", "monitoring.coreos.com"})

_INLINE_FLAGS = re.compile(r"\(\?([a-z]+)\)")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"

#: What the API server checks of every object's metadata (apimachinery's ObjectMeta rules), for
#: what a chart renders: a name, labels and annotations that are strings, valid label syntax.
OBJECT_META: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": rf"^{_DNS_SUBDOMAIN}$"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": rf"^{_DNS_LABEL}$"},
        "labels": {
            "type": "object",
            "propertyNames": {"pattern": rf"^({_DNS_SUBDOMAIN}/)?{_LABEL_NAME}$"},
            "additionalProperties": {
                "type": "string",
                "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$",
            },
        },
        "annotations": {
            "type": "object",
            "propertyNames": {"pattern": rf"^({_DNS_SUBDOMAIN}/)?{_LABEL_NAME}$"},
            "additionalProperties": {"type": "string"},
        },
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def _min_le_max(obj: Mapping[str, Any]) -> bool:
    low = obj.get("minReplicaCount")
    return low is None or low <= obj.get("maxReplicaCount", 100)


#: The CEL rules of the vendored schemas, each as its Python equivalent (``self`` = the object
#: the rule sits on). A rule missing here is reported as an error, never skipped.
CEL_RULES: Final[dict[str, Callable[[Mapping[str, Any]], bool]]] = {
    # keda.sh ScaledObject .spec
    "!has(self.minReplicaCount) || self.minReplicaCount <= "
    "(has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": _min_le_max,
}


def _go_regex(pattern: str) -> str:
    """A Go (RE2) pattern as Python's ``re`` reads it: Python wants inline flags (``(?i)``) at
    the start. Moved there, they mean the same for the vendored patterns (``^(?i)(abort|warn)?$``:
    nothing before the flag but the anchor)."""
    flags = "".join(_INLINE_FLAGS.findall(pattern))
    return f"(?{flags}){_INLINE_FLAGS.sub('', pattern)}" if flags else pattern


def _structural(node: Any) -> Any:
    """A CRD schema node as a JSON schema with the API server's semantics."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: _structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _structural(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_structural(sub) for sub in value]
        elif key == "description":
            continue
        elif key == "pattern":
            out[key] = _go_regex(value)
        else:
            out[key] = value
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    is_object = out.get("type") == "object" or "properties" in out
    if (
        is_object
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False  # pruned by the server; refused when strict
    return out


def _list_type(
    validator: Any, list_type: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not isinstance(instance, list) or list_type == "atomic":
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: set[str] = set()
    for item in instance:
        if list_type == "map" and isinstance(item, dict):
            identity = json.dumps([item.get(key) for key in keys])
        else:
            identity = json.dumps(item, sort_keys=True)
        if identity in seen:
            what = f"key {dict(zip(keys, json.loads(identity), strict=True))}" if keys else item
            yield ValidationError(f"duplicate entry in a list of type {list_type}: {what}")
        seen.add(identity)


def _cel(
    validator: Any, rules: list[dict[str, str]], instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not isinstance(instance, dict):
        return
    for rule in rules:
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            yield ValidationError(
                f"CEL rule not known to tests/support/k8s.py: {rule['rule']!r}; add its "
                "Python equivalent to CEL_RULES"
            )
        elif not check(instance):
            yield ValidationError(rule.get("message") or f"failed CEL rule {rule['rule']!r}")


_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


_Validator = validators.extend(
    Draft7Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel},
)


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@functools.cache
def _vendored() -> dict[tuple[str, str], Path]:
    """``(apiVersion, kind)`` -> the vendored file."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(CRD_SCHEMA_DIR.glob("*.json")):
        doc = _load(path)
        found[(f"{doc['group']}/{doc['version']}", doc["kind"])] = path
    return found


def vendored_kinds() -> list[tuple[str, str]]:
    """Every ``(apiVersion, kind)`` with a vendored schema."""
    return sorted(_vendored())


def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The vendored ``openAPIV3Schema`` of a kind, unchanged (with its source header)."""
    return _load(_vendored()[(api_version, kind)])


@functools.cache
def _validator(api_version: str, kind: str) -> Any:
    schema = _structural(copy.deepcopy(crd_schema(api_version, kind)["openAPIV3Schema"]))
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": api_version}
    props["kind"] = {"const": kind}
    props["metadata"] = OBJECT_META
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    _Validator.check_schema(schema)
    return _Validator(schema, format_checker=_FORMATS)


def is_crd_kind(obj: Mapping[str, Any]) -> bool:
    """Whether ``obj`` belongs to a CRD group validated here (not by kubernetes-validate)."""
    api_version = obj.get("apiVersion")
    return isinstance(api_version, str) and api_version.partition("/")[0] in CRD_GROUPS


def _where(error: ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(root)"


def validate_crd(obj: Mapping[str, Any]) -> list[str]:
    """Every problem of a custom resource against its vendored schema; ``[]`` when valid."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    name = (obj.get("metadata") or {}).get("name", "?")
    if (api_version, kind) not in _vendored():
        known = ", ".join(f"{v} {k}" for v, k in vendored_kinds())
        return [f"{kind}/{name}: no vendored schema for {api_version} {kind} (known: {known})"]
    validator = _validator(str(api_version), str(kind))
    errors = sorted(
        validator.iter_errors(dict(obj)), key=lambda e: [str(p) for p in e.absolute_path]
    )
    return [f"{kind}/{name}: {_where(e)}: {_describe(e)}" for e in errors]


def _describe(error: ValidationError) -> str:
    if error.validator == "anyOf" and error.context:
        return f"{error.message} ({'; '.join(sorted({e.message for e in error.context}))})"
    return error.message
