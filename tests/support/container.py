"""The container image's facts, read from deploy/docker/Dockerfile, and a container run here.

:class:`DockerfileFacts` parses the Dockerfile (stages, ENTRYPOINT, CMD, USER, ENV, EXPOSE) so
the tests use the image's exact facts rather than a copy of them. :class:`Container` runs a
command as a container runtime would run the image: PID 1 of a new PID namespace, the image's
numeric user with no capabilities, its ENV, a read-only root filesystem with an emptyDir
(a tmpfs) at /tmp, and the image's venv at its path; there is no docker daemon on the test
machine, so the interpreter running the tests stands in for the image's (needs root).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = (
    "BASE_IMAGE_PATH",
    "DOCKERFILE",
    "DOCKERIGNORE",
    "REPO",
    "Container",
    "DockerfileFacts",
    "Instruction",
    "Stage",
    "dockerignore_excludes",
    "namespace_processes",
    "parse_instructions",
    "proc_status",
    "require_containers",
)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
#: PATH of the official python images (what ``$PATH`` in the Dockerfile's ENV expands to).
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"

_EXACT_TAG = re.compile(r"^[^:@\s]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$")
_DIGEST = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# the Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV...
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where it starts


def parse_instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions: comments dropped (also inside continued lines, as
    BuildKit does), lines ending in a backslash joined with the next."""
    found: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = logical.partition(" ")
        found.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError(f"line {start}: a continued line never ends")
    return found


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def last(self, keyword: str) -> Instruction | None:
        matching = [i for i in self.instructions if i.keyword == keyword]
        return matching[-1] if matching else None

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _exec_form(args: str) -> tuple[str, ...] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD, or None for the shell form."""
    if not args.startswith("["):
        return None
    value = json.loads(args)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"not an exec form: {args}")
    return tuple(value)


def _env_pairs(args: str) -> list[tuple[str, str]]:
    """``ENV a=1 b="x y"`` (or the legacy ``ENV a 1``) as pairs, values unexpanded."""
    words = shlex.split(args, posix=True)
    if words and "=" not in words[0]:
        return [(words[0], args.partition(" ")[2].strip())]
    return [(k, v) for k, _, v in (w.partition("=") for w in words)]


def _expand(value: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


@dataclass(frozen=True)
class DockerfileFacts:
    """What the image is, as the Dockerfile says: the tests' one source for it."""

    path: Path
    instructions: tuple[Instruction, ...]
    stages: tuple[Stage, ...]

    @classmethod
    def load(cls, path: Path = DOCKERFILE) -> DockerfileFacts:
        instructions = parse_instructions(path.read_text())
        stages: list[Stage] = []
        current: list[Instruction] = []
        base, name = "", None
        for instruction in instructions:
            if instruction.keyword == "FROM":
                if base:
                    stages.append(Stage(base, name, tuple(current)))
                words = [w for w in instruction.args.split() if not w.startswith("--")]
                base = words[0]
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                current = []
            elif base:
                current.append(instruction)
        if base:
            stages.append(Stage(base, name, tuple(current)))
        if not stages:
            raise ValueError(f"{path}: no FROM")
        return cls(path, tuple(instructions), tuple(stages))

    @property
    def runtime(self) -> Stage:
        """The final stage: what the image is."""
        return self.stages[-1]

    def _runtime_arg(self, keyword: str) -> str:
        found = self.runtime.last(keyword)
        if found is None:
            raise ValueError(f"{self.path}: the final stage has no {keyword}")
        return found.args

    @property
    def entrypoint(self) -> tuple[str, ...]:
        """The exec-form ENTRYPOINT (a shell-form one is an error: PID 1 would be a shell)."""
        form = _exec_form(self._runtime_arg("ENTRYPOINT"))
        if form is None:
            raise ValueError(f"{self.path}: ENTRYPOINT is in shell form")
        return form

    @property
    def cmd(self) -> tuple[str, ...]:
        form = _exec_form(self._runtime_arg("CMD"))
        if form is None:
            raise ValueError(f"{self.path}: CMD is in shell form")
        return form

    @property
    def user(self) -> str:
        return self._runtime_arg("USER")

    @property
    def uid_gid(self) -> tuple[int, int]:
        """USER as numbers (``10001:10001``); a name is an error (runAsNonRoot cannot check it)."""
        uid, _, gid = self.user.partition(":")
        if not uid.isdigit() or not gid.isdigit():
            raise ValueError(f"{self.path}: USER {self.user} is not numeric uid:gid")
        return int(uid), int(gid)

    @property
    def raw_env(self) -> dict[str, str]:
        """The final stage's ENV, in order, values as written (``$PATH`` unexpanded)."""
        env: dict[str, str] = {}
        for instruction in self.runtime.all("ENV"):
            env.update(_env_pairs(instruction.args))
        return env

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The image's environment: the base image's (``PATH``) and the ENV over it, expanded."""
        env = dict(base if base is not None else {"PATH": BASE_IMAGE_PATH})
        for instruction in self.runtime.all("ENV"):
            for key, value in _env_pairs(instruction.args):
                env[key] = _expand(value, env)
        return env

    @property
    def venv(self) -> Path:
        """The image's venv: the directory above the first PATH entry (``/opt/venv/bin``)."""
        return Path(self.env()["PATH"].split(":")[0]).parent

    @property
    def exposed(self) -> list[str]:
        return [p for i in self.runtime.all("EXPOSE") for p in i.args.split()]

    @property
    def workdir(self) -> str:
        found = self.runtime.last("WORKDIR")
        return found.args if found is not None else "/"

    @staticmethod
    def is_pinned(base: str) -> bool:
        """An exact version tag (``python:3.11.13-slim-bookworm``) or a digest."""
        return bool(_EXACT_TAG.match(base) or _DIGEST.match(base))


# --------------------------------------------------------------------------------------------
# .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + "$")


def dockerignore_excludes(path: str, patterns: Iterable[str] | None = None) -> bool:
    """Whether ``.dockerignore`` keeps ``path`` (relative to the context) out of the build
    context: Docker's rules, the last matching pattern wins, ``!`` re-includes, and a pattern
    matching a parent directory matches everything under it."""
    if patterns is None:
        patterns = DOCKERIGNORE.read_text().splitlines()
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().strip("/"))
        regex = _pattern_regex(pattern)
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------------------------
# running as the image would


def require_containers() -> None:
    """Skip the test unless this machine can run :class:`Container` (root, unshare, setpriv,
    mount); under CI (``CI`` set) fail it instead: the suite would prove nothing."""
    if os.geteuid() != 0:
        reason = "needs root to create PID and mount namespaces"
    else:
        missing = [t for t in ("unshare", "setpriv", "mount") if shutil.which(t) is None]
        reason = f"needs {', '.join(missing)} on PATH" if missing else ""
    if not reason:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}\n(CI is set, so this is a failure)", pytrace=False)
    pytest.skip(reason)


def _exposures(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """What makes ``paths`` reachable by any user: the outermost directories on the way that
    others may not traverse (``/root`` of a pyenv install, 0700), each to be covered by a tmpfs,
    and the entries under the innermost such directory, to be bound back in at their path."""
    covers: set[Path] = set()
    sources: set[Path] = set()
    for path in paths:
        blocked = [
            p for p in reversed(path.parents) if p != Path("/") and not p.stat().st_mode & 0o001
        ]
        if blocked:
            covers.add(blocked[0])
            sources.add(blocked[-1] / path.relative_to(blocked[-1]).parts[0])
    return (
        sorted(c for c in covers if not any(o in c.parents for o in covers)),
        sorted(x for x in sources if not any(o in x.parents for o in sources)),
    )


@dataclass
class Container:
    """A command run as the image runs it: ``argv`` as PID 1 of a new PID namespace, as
    ``uid:gid`` with no capabilities and no new privileges, with exactly ``env``.

    In its own mount namespace: the root filesystem read-only (``readOnlyRootFilesystem``), a
    fresh tmpfs at ``/tmp`` (the pod's emptyDir), the test's interpreter venv at the image's
    venv path (``/opt/venv``, so the image's PATH finds ``workerkit`` where the image has it),
    each of ``volumes`` (host directories, chowned to the uid) writable at its own path, and the
    directories on the way to the interpreter that others may not traverse (``/root`` of a
    pyenv install) replaced by a tmpfs holding only what is needed.
    """

    argv: Sequence[str]
    env: Mapping[str, str]
    uid: int
    gid: int
    image_venv: Path
    volumes: Sequence[Path] = ()
    read_only_root: bool = True
    empty_dirs: Sequence[str] = ("/tmp",)  # each a fresh tmpfs (a pod's emptyDir volumes)
    workdir: str = "/"
    #: The passwd/group entry name the image gives the uid (deploy/docker/Dockerfile copies
    #: them from its builder stage); added over the host's files when they lack the uid.
    user_name: str | None = "workerkit"
    host_venv: Path = field(default_factory=lambda: Path(sys.prefix))

    def host_argv(self) -> list[str]:
        """The command to start here: unshare, then the setup script, then the exec."""
        tools = {t: shutil.which(t) or t for t in ("unshare", "setpriv", "mount", "mkdir", "sh")}
        return [
            tools["unshare"],
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
            "--kill-child",
            "--propagation",
            "private",
            tools["sh"],
            "-c",
            self._script(tools),
            "container-init",
            *self.argv,
        ]

    def prepare(self) -> None:
        """Hand the volumes to the container's user (as an fsGroup-owned emptyDir would be)."""
        for volume in self.volumes:
            for path in [volume, *volume.rglob("*")]:
                os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def _user_entries(self, mount: str) -> list[str]:
        """Bind the host's passwd and group files with the image's entries for the uid."""
        if self.user_name is None:
            return []
        lines = []
        entries = {
            "passwd": (
                self.uid,
                f"{self.user_name}:x:{self.uid}:{self.gid}::/tmp:/usr/sbin/nologin",
            ),
            "group": (self.gid, f"{self.user_name}:x:{self.gid}:"),
        }
        for name, (number, entry) in entries.items():
            host = Path("/etc") / name
            ids = {
                line.split(":")[2] for line in host.read_text().splitlines() if line.count(":") >= 3
            }
            if str(number) in ids:
                continue
            staged = f"/dev/shm/{name}"
            lines.append(
                f"{{ cat {host}; echo {shlex.quote(entry)}; }} > {staged}"
                f" && {mount} --bind {staged} {host}"
            )
        return lines

    def _script(self, tools: Mapping[str, str]) -> str:
        q = shlex.quote
        mount, mkdir = tools["mount"], tools["mkdir"]
        needed = [
            Path(os.path.realpath(sys.executable)),
            Path(sys.prefix),
            Path(sys.base_prefix),
            REPO,
        ]  # the volumes are exposed whole, at their own path
        lines = ["set -eu", f"{mount} -t tmpfs -o mode=700 wk-stage /dev/shm"]
        moves: list[tuple[str, str]] = []  # (staged, target)

        def stage(source: Path, target: Path) -> None:
            staged = f"/dev/shm/s{len(moves)}"
            lines.extend([f"{mkdir} {staged}", f"{mount} --rbind {q(str(source))} {staged}"])
            moves.append((staged, str(target)))

        covered: list[str] = []  # tmpfs mount points, in order
        covers, sources = _exposures(needed)
        for source in sources:
            stage(source, source)
        for path in needed[1:]:  # a checkout or venv under /tmp: hidden by the emptyDir
            if any(Path(e) in path.parents for e in self.empty_dirs):
                stage(path, path)
        covered.extend(str(c) for c in covers)
        stage(self.host_venv, self.image_venv)
        if not self.image_venv.exists():  # a tmpfs over its nearest parent, to create it in
            parent = next(p for p in self.image_venv.parents if p.exists())
            if parent == Path("/"):
                raise ValueError(f"no directory above {self.image_venv} to mount a tmpfs on")
            covered.append(str(parent))
        for volume in self.volumes:
            stage(volume, volume)
        covered.extend(self.empty_dirs)
        for point in covered:
            mode = "1777" if point in self.empty_dirs else "755"
            lines.append(f"{mount} -t tmpfs -o mode={mode} wk-{Path(point).name} {q(point)}")
        volumes = {str(v) for v in self.volumes}
        for staged, target in moves:
            lines.extend([f"{mkdir} -p {q(target)}", f"{mount} --move {staged} {q(target)}"])
            if target not in volumes:  # the interpreter and the venv: read-only, as in the image
                lines.append(f"{mount} -o remount,bind,ro {q(target)}")
        lines.extend(self._user_entries(mount))
        if self.read_only_root:
            lines.append(f"{mount} -o remount,bind,ro /")
        lines.append("chmod 1777 /dev/shm")  # the staging tmpfs stays: the pod's own /dev/shm
        lines.append(f"cd {q(self.workdir)} && unset PWD OLDPWD")  # the shell's, not ours
        lines.append(
            f"exec {tools['setpriv']} --reuid={self.uid} --regid={self.gid} --clear-groups"
            ' --no-new-privs --inh-caps=-all --bounding-set=-all -- "$@"'
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# looking into a running container from outside


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict (``Uid``, ``Gid``, ``CapEff``, ``NSpid``, ``State``...);
    empty once the process is gone (reaped)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def namespace_processes(pid1: int) -> dict[int, dict[str, str]]:
    """Every process of the container whose PID 1 is host pid ``pid1``, by host pid: PID 1
    and its descendants (an orphan re-parented to PID 1 is among them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            status = proc_status(int(entry.name))
            if status.get("PPid", "").isdigit():
                children.setdefault(int(status["PPid"]), []).append(int(entry.name))
    found: dict[int, dict[str, str]] = {}
    pending = [pid1]
    while pending:
        pid = pending.pop()
        status = proc_status(pid)
        if status:
            found[pid] = status
            pending.extend(children.get(pid, []))
    return found
