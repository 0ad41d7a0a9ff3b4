"""The dashboard's actions: retry, discard or cancel a job, pause or resume a queue, pause,
resume or trigger a schedule.

Each is a POST with the session's CSRF token (403 without it, or with an ``Origin`` of another
host). Without ``confirm=yes`` it answers a confirmation page; with it, it acts once and
redirects (303) back with a flash message. A job action names the ``version`` the page showed:
the engine's fenced write refuses it when the job moved on (409, "changed since ...: nothing
done"). Job and queue actions are logged by the engine's source (``event=dashboard_action``, one
line each); this module logs the schedule actions, and an action the store could not be
reached for, so that every action has exactly one line.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl

from starlette.responses import Response

from workerkit.dashboard.auth import CSRF_COOKIE, csrf_ok, origin_ok
from workerkit.dashboard.model import ActionRefused, StaleAction
from workerkit.dashboard.views import job_url, query_url
from workerkit.dashboard.web import Ctx, Web, local_path
from workerkit.errors import StoreUnavailable

if TYPE_CHECKING:
    from starlette.requests import Request

    from workerkit.dashboard.model import JobDetail
    from workerkit.scheduler.contract import SchedulerBinding

__all__ = ("MAX_FORM_BYTES", "Actions", "read_form")

log = logging.getLogger("workerkit.dashboard")

MAX_FORM_BYTES: Final = 64 * 1024

#: action -> (the source's method, what the confirmation page says, the flash when done).
_JOB_ACTIONS: Final = {
    "retry": (
        "retry_failed",
        (
            "Retry job {id}: back to waiting, due now, with a fresh attempt count (its error "
            "is kept where the engine keeps a history)."
        ),
        "job {id} retried: waiting, due now",
    ),
    "discard": (
        "discard_failed",
        "Discard job {id}: it is deleted for good.",
        "job {id} discarded",
    ),
    "cancel": (
        "cancel_waiting",
        (
            "Cancel job {id}: it is taken off its queue before it runs and becomes failed "
            '("cancelled by {actor} from the dashboard"); it can be retried.'
        ),
        "job {id} cancelled",
    ),
}
_QUEUE_ACTIONS: Final = {
    "pause": (
        "pause_queue",
        (
            "Pause queue {name}: workers start nothing more from it (within a second or two); "
            "the jobs they hold run on. Nothing is lost: jobs wait."
        ),
        "queue {name} paused: workers start nothing more from it",
    ),
    "resume": (
        "resume_queue",
        "Resume queue {name}: workers fetch from it again.",
        "queue {name} resumed",
    ),
}
_SCHEDULE_ACTIONS: Final = {
    "pause": (
        "Pause schedule {name}: no scheduler replica fires it until it is resumed.",
        "schedule {name} paused",
    ),
    "resume": (
        "Resume schedule {name}: it fires again at its next time.",
        "schedule {name} resumed",
    ),
    "trigger": (
        (
            "Trigger schedule {name} now: the leader fires it once, with the store's time now "
            "as its fire time."
        ),
        "schedule {name} triggered: the leader fires it shortly",
    ),
}


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (at most 64 KiB); {} for anything else."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length", "")
    if kind != "application/x-www-form-urlencoded" or (
        length.isdigit() and int(length) > MAX_FORM_BYTES
    ):
        return {}
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


class Actions:
    """The POST endpoints (wrapped by :meth:`Web.guard` for authentication)."""

    def __init__(self, web: Web) -> None:
        self.web = web

    async def _form(self, request: Request, ctx: Ctx) -> dict[str, str] | Response:
        form = await read_form(request)
        if not origin_ok(request.headers.get("origin"), request.headers.get("host")):
            why = f"refused: the request came from another site ({request.headers['origin']})"
        elif not csrf_ok(request.cookies.get(CSRF_COOKIE), form.get("csrf")):
            why = "refused: the form's CSRF token is missing or wrong (reload the page and retry)"
        else:
            return form
        log.warning(
            "dashboard action refused: %s",
            why,
            extra={"event": "dashboard_csrf_refused", "path": request.url.path, "actor": ctx.actor},
        )
        return self.web.message(ctx, 403, why)

    def _confirm(self, ctx: Ctx, text: str, back: str, **hidden: str) -> Response:
        fields = {**hidden, "back": back, "csrf": ctx.csrf, "confirm": "yes"}
        return self.web.render(
            ctx, "confirm.html", text=text, action=ctx.request.url.path, fields=fields, back=back
        )

    async def job(self, request: Request, ctx: Ctx) -> Response:
        form = await self._form(request, ctx)
        if isinstance(form, Response):
            return form
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        if action not in _JOB_ACTIONS:
            return self.web.message(ctx, 404, f"no job action {action!r}")
        method, confirm_text, done_text = _JOB_ACTIONS[action]
        source = self.web.source
        version = form.get("version", "")
        fallback = query_url("/jobs", state="failed") if action == "discard" else job_url(job_id)
        back = local_path(form.get("back"), fallback)
        if form.get("confirm") != "yes":
            detail = await self.web.call(source.job, job_id)
            if detail is None:
                return self.web.message(ctx, 404, f"no job {job_id!r} (any more)", back="/jobs")
            text = confirm_text.format(id=job_id, actor=ctx.actor)
            return self._confirm(ctx, text, back, version=version)
        try:
            await self.web.call(getattr(source, method), job_id, version, ctx.actor)
        except StaleAction as exc:
            return await self._stale(ctx, job_id, str(exc))
        except ActionRefused as exc:
            detail = await self.web.call(source.job, job_id)
            return self.web.message(ctx, 404 if detail is None else 400, str(exc), back=back)
        except StoreUnavailable as exc:
            _log_unavailable(action, ctx.actor, exc, job_id=job_id)
            raise
        return self.web.redirect(ctx, back, ("ok", done_text.format(id=job_id)))

    async def _stale(self, ctx: Ctx, job_id: str, text: str) -> Response:
        """409: the job page as it is now, with the refusal as its flash."""

        def read() -> tuple[float, JobDetail | None]:
            return self.web.source.clock(), self.web.source.job(job_id)

        now, detail = await self.web.call(read)
        if detail is None:
            return self.web.message(ctx, 409, text, back="/jobs")
        return self.web.render(
            ctx,
            "job.html",
            status=409,
            flash=("error", text),
            now=now,
            detail=detail,
            row=detail.row,
        )

    async def queue(self, request: Request, ctx: Ctx) -> Response:
        form = await self._form(request, ctx)
        if isinstance(form, Response):
            return form
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in _QUEUE_ACTIONS:
            return self.web.message(ctx, 404, f"no queue action {action!r}")
        method, confirm_text, done_text = _QUEUE_ACTIONS[action]
        back = local_path(form.get("back"), "/")
        if form.get("confirm") != "yes":
            return self._confirm(ctx, confirm_text.format(name=name), back)
        try:
            await self.web.call(getattr(self.web.source, method), name, ctx.actor)
        except ActionRefused as exc:
            return self.web.message(ctx, 400, str(exc), back=back)
        except StoreUnavailable as exc:
            _log_unavailable(action, ctx.actor, exc, queue=name)
            raise
        return self.web.redirect(ctx, back, ("ok", done_text.format(name=name)))

    async def schedule(self, request: Request, ctx: Ctx) -> Response:
        form = await self._form(request, ctx)
        if isinstance(form, Response):
            return form
        name, action = request.path_params["name"], request.path_params["action"]
        if action not in _SCHEDULE_ACTIONS:
            return self.web.message(ctx, 404, f"no schedule action {action!r}")
        confirm_text, done_text = _SCHEDULE_ACTIONS[action]
        back = local_path(form.get("back"), "/schedules")
        binding = await self.web.binding()
        if binding is None:
            return self.web.message(ctx, 404, "the app declares no schedules", back=back)
        if form.get("confirm") != "yes":
            return self._confirm(ctx, confirm_text.format(name=name), back)
        try:
            known = await self.web.call(_schedule_write, binding, name, action)
        except StoreUnavailable as exc:
            _log_unavailable(action, ctx.actor, exc, schedule=name)
            raise
        _log_action(action, ctx.actor, "done" if known else "refused", schedule=name)
        if not known:
            text = (
                f"the store knows no schedule {name!r}; a schedule is known once a scheduler "
                "leader registered it (workerkit scheduler running this app)"
            )
            return self.web.message(ctx, 404, text, back=back)
        return self.web.redirect(ctx, back, ("ok", done_text.format(name=name)))


def _schedule_write(binding: SchedulerBinding, name: str, action: str) -> bool:
    store = binding.store
    if action == "trigger":
        return store.request_trigger(name, store.clock())
    return store.set_paused(name, action == "pause")


def _log_action(action: str, actor: str, outcome: str, **target: str) -> None:
    log.info(
        "dashboard %s %s: %s",
        action,
        " ".join(target.values()),
        outcome,
        extra={"event": "dashboard_action", "action": action, "actor": actor, "outcome": outcome}
        | target,
    )


def _log_unavailable(action: str, actor: str, exc: StoreUnavailable, **target: str) -> None:
    log.warning(
        "dashboard %s %s: the store is unreachable: %s",
        action,
        " ".join(target.values()),
        exc,
        extra={
            "event": "dashboard_action",
            "action": action,
            "actor": actor,
            "outcome": "unavailable",
            "error": str(exc),
        }
        | target,
    )
