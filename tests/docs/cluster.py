"""The commands of a tutorial that need a cluster, a helm binary or a docker daemon.

None of those is on the test machines. A console block marked ``<!-- tutorial: helm-sdk -->``
holds ``helm template`` commands: :func:`helm_template` runs them through Helm's own SDK
(helm-python-sdk, tests/support/helm.py), with the same release, chart, namespace, values files,
``--set`` and ``--kube-version``, writing ``--output-dir`` as the binary does. A block marked
``<!-- tutorial: cluster-only -->`` holds commands for the reader's cluster (``helm install``,
``kubectl ...``): :func:`problems_of` checks each for what can be checked here (a known
subcommand and known flags, the chart and the values files on disk, the names of the rendered
objects it refers to); the tutorial's own test acts out what they do (the kubelet mimic).
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support import helm

__all__ = (
    "HelmCommand",
    "helm_template",
    "kubectl_args",
    "merge_values",
    "parse_helm",
    "problems_of",
)

#: helm's flags the tutorials use, per subcommand, and whether each takes a value.
_HELM_FLAGS: dict[str, dict[str, bool]] = {
    "template": {"-n": True, "--namespace": True, "-f": True, "--values": True, "--set": True,
                 "--kube-version": True, "--output-dir": True},
    "install": {"-n": True, "--namespace": True, "-f": True, "--values": True, "--set": True,
                "--create-namespace": False, "--wait": False, "--atomic": False},
    "upgrade": {"-n": True, "--namespace": True, "-f": True, "--values": True, "--set": True,
                "--install": False, "--wait": False, "--atomic": False},
}  # fmt: skip
#: kubectl's verbs the tutorials use, and the flags that take a value.
_KUBECTL_VERBS = {"create", "get", "delete", "logs", "exec", "rollout", "describe", "apply"}
_KUBECTL_VALUED = {"-n", "--namespace", "-l", "--selector", "--from-literal", "-c", "--container",
                   "--tail", "-o", "--output"}  # fmt: skip
_KUBECTL_FLAGS = {*_KUBECTL_VALUED, "-f", "--follow", "--wait", "-it", "-w", "--watch"}
#: kubectl's short names of the kinds the chart renders.
_KINDS = {"deploy": "Deployment", "deployment": "Deployment", "job": "Job",
          "pdb": "PodDisruptionBudget", "sa": "ServiceAccount"}  # fmt: skip


@dataclass
class HelmCommand:
    subcommand: str
    release: str
    chart: str
    namespace: str = "default"
    values_files: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    kube_version: str | None = None
    output_dir: str | None = None


def parse_helm(line: str) -> HelmCommand:
    """A ``helm template|install|upgrade`` line; ValueError naming an unknown flag."""
    argv = shlex.split(line)
    if argv[:1] != ["helm"] or len(argv) < 2 or argv[1] not in _HELM_FLAGS:
        raise ValueError(f"not a helm template/install/upgrade command: {line}")
    flags = _HELM_FLAGS[argv[1]]
    positional: list[str] = []
    command = HelmCommand(argv[1], "", "")
    words = iter(argv[2:])
    for word in words:
        name, eq, inline = word.partition("=")
        if not word.startswith("-"):
            positional.append(word)
            continue
        if name not in flags:
            raise ValueError(f"helm {argv[1]}: unknown flag {name}")
        if not flags[name]:
            continue
        value = inline if eq else next(words, None)
        if value is None:
            raise ValueError(f"helm {argv[1]}: {name} needs a value")
        if name in ("-n", "--namespace"):
            command.namespace = value
        elif name in ("-f", "--values"):
            command.values_files.append(value)
        elif name == "--set":
            command.sets.append(value)
        elif name == "--kube-version":
            command.kube_version = value if value.startswith("v") else f"v{value}"
        else:
            command.output_dir = value
    if len(positional) != 2:
        raise ValueError(f"helm {argv[1]}: expected RELEASE CHART, got {positional}")
    command.release, command.chart = positional
    return command


def merge_values(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` over ``base``, maps merged key by key, as helm merges values files."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _values(command: HelmCommand, cwd: Path) -> dict[str, Any]:
    """The values helm would use: each file in order, then each ``--set`` (plain keys only)."""
    values: dict[str, Any] = {}
    for name in command.values_files:
        values = merge_values(values, yaml.safe_load((cwd / name).read_text()) or {})
    for assignment in command.sets:
        key, _, raw = assignment.partition("=")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return values


def helm_template(
    line: str, cwd: Path, override: Mapping[str, Any] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Run a ``helm template`` line through the SDK: (its output lines, the manifests by path).

    ``override``: values the test adds over the page's (a free port on a shared machine).
    """
    command = parse_helm(line)
    assert command.subcommand == "template", line
    chart = (cwd / command.chart).resolve()
    assert chart == helm.CHART_DIR, f"{command.chart}: not the project's chart"
    values = merge_values(_values(command, cwd), override or {})
    manifests = helm.render_manifests(
        values,
        base=False,
        name=command.release,
        namespace=command.namespace,
        kube_version=command.kube_version,
    )
    kept = {
        path: text
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml") and any(yaml.safe_load_all(text))
    }
    if command.output_dir is None:
        return "".join(f"---\n# Source: {p}\n{t}" for p, t in kept.items()).splitlines(), kept
    out: list[str] = []
    for path, text in kept.items():  # as helm writes them: OUTPUT_DIR/CHART/templates/FILE
        target = cwd / command.output_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"---\n# Source: {path}\n{text}")
        out.append(f"wrote {command.output_dir}/{path}")
    return out, kept


def kubectl_args(line: str) -> tuple[str, list[str], dict[str, list[str]], list[str]]:
    """(verb, positional arguments, flags with their values, the command after ``--``)."""
    argv = shlex.split(line)
    assert argv[:1] == ["kubectl"], line
    after: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, after = argv[:at], argv[at + 1 :]
    positional: list[str] = []
    flags: dict[str, list[str]] = {}
    words = iter(argv[1:])
    for word in words:
        if not word.startswith("-"):
            positional.append(word)
            continue
        name, eq, inline = word.partition("=")
        if name not in _KUBECTL_FLAGS:
            raise ValueError(f"kubectl: unknown flag {name}")
        value = (inline if eq else next(words, "")) if name in _KUBECTL_VALUED else ""
        flags.setdefault(name, []).append(value)
    if not positional or positional[0] not in _KUBECTL_VERBS:
        raise ValueError(f"kubectl: unknown verb in {line}")
    return positional[0], positional[1:], flags, after


def problems_of(
    line: str, cwd: Path, objects: Collection[Mapping[str, Any]], namespace: str
) -> list[str]:
    """What is wrong with a cluster-only command line, as far as it can be told here.

    ``objects``: every object the chart rendered; a ``kind/name`` argument must be one of them,
    a ``-l key=value`` selector must match a rendered pod template's labels, and ``-n`` must be
    the namespace it was rendered for.
    """
    program = shlex.split(line)[0]
    try:
        if program == "helm":
            command = parse_helm(line)
            found = [f"{f}: no such values file" for f in command.values_files
                     if not (cwd / f).is_file()]  # fmt: skip
            if (cwd / command.chart).resolve() != helm.CHART_DIR:
                found.append(f"{command.chart}: not the project's chart")
            if command.namespace != namespace:
                found.append(f"namespace {command.namespace}, rendered for {namespace}")
            return found
        if program != "kubectl":
            return [f"{program}: not a command the tutorials' checks know"]
        verb, positional, flags, after = kubectl_args(line)
    except ValueError as error:
        return [str(error)]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    pod_labels = [
        o["spec"]["template"]["metadata"].get("labels", {})
        for o in objects
        if "template" in o.get("spec", {})
    ]
    found = []
    if flags.get("-n", flags.get("--namespace")) != [namespace]:
        found.append(f"kubectl {verb}: not in namespace {namespace}")
    for argument in positional:
        kind, slash, name = argument.partition("/")
        if slash and kind in _KINDS and (_KINDS[kind], name) not in names:
            found.append(f"{argument}: the chart renders no {_KINDS[kind]} {name}")
    for selector in flags.get("-l", []) + flags.get("--selector", []):
        wanted = dict(term.partition("=")[::2] for term in selector.split(","))
        if not any(wanted.items() <= labels.items() for labels in pod_labels):
            found.append(f"-l {selector}: matches no pod the chart renders")
    if verb == "exec" and not after:
        found.append("kubectl exec: no command after --")
    return found
