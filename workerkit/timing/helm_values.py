"""``workerkit check --format helm-values``: a checked budget as the Helm chart's ``timing`` block.

The chart (deploy/helm/workerkit) names each timing setting in camelCase; the maps below are the
one place that pairs those names with workerkit's settings. Only the values that differ from the
defaults are printed (the chart's defaults are workerkit's), and one comment line says how each
rule fared, so the block can be pasted into a values file as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from workerkit.settings import Settings, setting_specs
from workerkit.timing.budget import BudgetReport, format_seconds

__all__ = ("CHART_SCHEDULER_KEYS", "CHART_TIMING_KEYS", "chart_values", "render_helm_values")

#: The chart's ``timing`` keys (top level, a pool's, the scheduler's) -> workerkit settings.
CHART_TIMING_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "gracePeriod": "grace_period",
        "prestopDelay": "prestop_delay",
        "releaseMargin": "release_margin",
        "jobTimeout": "job_timeout",
        "visibilityTimeout": "visibility_timeout",
        "heartbeatInterval": "heartbeat_interval",
        "checkpointInterval": "checkpoint_interval",
        "idempotencyInProgressExpiry": "idempotency_in_progress_expiry",
        "idempotencyRetention": "idempotency_retention",
        "maxCountdown": "max_countdown",
        "strict": "strict",
    }
)

#: The scheduler's own keys in the chart's ``scheduler.timing`` -> workerkit settings.
CHART_SCHEDULER_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "leaseDuration": "scheduler_lease_duration",
        "renewDeadline": "scheduler_renew_deadline",
        "retryPeriod": "scheduler_retry_period",
        "standbyDelay": "scheduler_standby_delay",
        "misfireGrace": "scheduler_misfire_grace",
        "retention": "scheduler_retention",
        "namespace": "scheduler_namespace",
    }
)

#: Kubernetes takes these in whole seconds (terminationGracePeriodSeconds, preStop sleep).
_WHOLE_SECONDS = ("gracePeriod", "prestopDelay")

Value = float | int | bool | str


def chart_values(settings: Settings, keys: Mapping[str, str]) -> dict[str, Value]:
    """The chart keys of ``keys`` whose settings differ from workerkit's defaults."""
    defaults = {spec.name: spec.default for spec in setting_specs()}
    out: dict[str, Value] = {}
    for key, name in keys.items():
        value = getattr(settings, name)
        if value is not None and value != defaults[name]:
            out[key] = value
    return out


def _yaml_scalar(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return format_seconds(float(value), exact=True)


def _verdicts(report: BudgetReport) -> str:
    """``# workerkit check --engine ENGINE -- errors: ...; ok: ...``: rule ids, in order."""
    ids = list(dict.fromkeys(f.rule_id for f in report.findings))
    errors = {f.rule_id for f in report.errors}
    warnings = {f.rule_id for f in report.warnings} - errors
    groups = {
        "errors": [i for i in ids if i in errors],
        "warnings": [i for i in ids if i in warnings],
        "ok": [i for i in ids if i not in errors and i not in warnings],
    }
    parts = "; ".join(f"{name}: {' '.join(group) or 'none'}" for name, group in groups.items())
    strict = " --strict" if report.strict else ""
    return f"# workerkit check --engine {report.budget.engine}{strict} -- {parts}"


def _block(name: str, values: Mapping[str, Value], indent: str) -> list[str]:
    if not values:
        return [f"{indent}{name}: {{}}"]
    return [f"{indent}{name}:"] + [f"{indent}  {k}: {_yaml_scalar(v)}" for k, v in values.items()]


def render_helm_values(report: BudgetReport, settings: Settings) -> str:
    """The chart's ``timing`` block for ``settings`` (and ``scheduler.timing`` when the
    scheduler's settings differ from the defaults), after a comment with the rule verdicts."""
    timing = chart_values(settings, CHART_TIMING_KEYS)
    scheduler = chart_values(settings, CHART_SCHEDULER_KEYS)
    lines = [_verdicts(report)]
    fractional = [k for k in _WHOLE_SECONDS if k in timing and not float(timing[k]).is_integer()]
    if fractional:
        rounded = ", ".join(f"{k}: {math.ceil(float(timing[k]))}" for k in fractional)
        lines.append(
            f"# the chart takes {' and '.join(fractional)} in whole seconds, as Kubernetes "
            f"does: round up ({rounded}) and check again"
        )
    lines += _block("timing", timing, "")
    if scheduler:
        lines += ["scheduler:", *_block("timing", scheduler, "  ")]
    return "\n".join(lines)
