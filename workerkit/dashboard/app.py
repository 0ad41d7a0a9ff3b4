"""The dashboard's Starlette app: the pages (overview, jobs, a job, workers, schedules, search),
the login form, the actions (:mod:`workerkit.dashboard.actions`) and the history sampler.

``create_app(source, options=...)`` takes any :class:`~workerkit.dashboard.model.DashboardSource`;
``workerkit dashboard ENGINE`` serves it with uvicorn. Routes and markup: docs/howto/dashboard.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast, get_args

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from workerkit.dashboard.actions import Actions, read_form
from workerkit.dashboard.auth import AUTH_COOKIE, CSRF_COOKIE, csrf_ok, new_csrf_token, origin_ok
from workerkit.dashboard.charts import throughput_svg
from workerkit.dashboard.history import run_sampler
from workerkit.dashboard.model import JOB_STATES, JobQuery, JobState
from workerkit.dashboard.views import worker_views
from workerkit.dashboard.web import Ctx, DashboardOptions, HostGuard, Web, local_path

if TYPE_CHECKING:
    from starlette.requests import Request

    from workerkit.dashboard.model import DashboardSource, QueueSummary
    from workerkit.engines.presence import Presence

__all__ = ("DashboardOptions", "create_app")

log = logging.getLogger("workerkit.dashboard")


def create_app(source: DashboardSource, *, options: DashboardOptions | None = None) -> Starlette:
    """The dashboard for ``source``: pages, actions, static files and the history sampler (a
    background task from startup to shutdown; the app does not close ``source``)."""
    pages = Pages(source, options or DashboardOptions())
    actions = Actions(pages)
    guard = pages.guard
    routes = [
        Route("/healthz", _healthz),
        Route("/", guard(pages.overview)),
        Route("/jobs", guard(pages.jobs)),
        Route("/jobs/{job_id:path}", guard(pages.job)),
        Route("/workers", guard(pages.workers)),
        Route("/schedules", guard(pages.schedules)),
        Route("/search", guard(pages.search)),
        Route("/login", pages.login_endpoint, methods=["GET", "POST"]),
        Route("/logout", guard(pages.logout), methods=["POST"]),
        Route("/actions/jobs/{job_id:path}/{action}", guard(actions.job), methods=["POST"]),
        Route("/actions/queues/{name:path}/{action}", guard(actions.queue), methods=["POST"]),
        Route("/actions/schedules/{name:path}/{action}", guard(actions.schedule), methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("workerkit.dashboard", "static")]), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as group:
            group.start_soon(run_sampler, source, pages.history, pages.options.sample_interval)
            yield
            group.cancel_scope.cancel()

    middleware = [Middleware(HostGuard, allowed=pages.options.allowed_hosts)]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.dashboard = pages
    return app


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


class Pages(Web):
    """The GET pages."""

    async def overview(self, request: Request, ctx: Ctx) -> Response:
        def read() -> tuple[float, list[QueueSummary], list[Presence]]:
            return self.source.clock(), self.source.queues(), self.source.workers()

        now, queues, presences = await self.call(read)
        charts = {q.name: throughput_svg(q.name, self.history.series(q.name, now)) for q in queues}
        workers = worker_views(presences, now)
        states: dict[str, int] = {}
        for view in workers:
            states[view.state] = states.get(view.state, 0) + 1
        schedules = await self._schedule_overview()
        return self.render(
            ctx,
            "overview.html",
            now=now,
            queues=sorted(queues, key=lambda q: q.name),
            charts=charts,
            worker_states=sorted(states.items()),
            worker_count=len(workers),
            schedules=schedules,
        )

    async def _schedule_overview(self) -> Any:
        from workerkit.scheduler.overview import overview

        binding = await self.binding()
        if binding is None:
            return None
        return await self.call(overview, binding)

    async def jobs(self, request: Request, ctx: Ctx) -> Response:
        params = request.query_params
        state = params.get("state") or "waiting"
        if state not in get_args(JobState):
            return self.message(
                ctx, 400, f"state {state!r}: give one of {', '.join(JOB_STATES)}", back="/jobs"
            )
        query = JobQuery(
            state=cast("JobState", state),
            queue=params.get("queue") or None,
            task=params.get("task") or None,
            cursor=params.get("cursor") or None,
            limit=self.options.page_size,
        )

        def read() -> tuple[float, Any, list[str]]:
            # The filter's queue names as the sampler last saw them (at most a sample old):
            # counting every queue for a list of names would double the page's cost.
            names = self.history.queue_names()
            if names is None:
                names = sorted(q.name for q in self.source.queues())
            return self.source.clock(), self.source.jobs(query), names

        now, page, names = await self.call(read)
        return self.render(
            ctx, "jobs.html", now=now, page=page, query=query, states=JOB_STATES, queue_names=names
        )

    async def job(self, request: Request, ctx: Ctx) -> Response:
        job_id = request.path_params["job_id"]

        def read() -> tuple[float, Any]:
            return self.source.clock(), self.source.job(job_id)

        now, detail = await self.call(read)
        if detail is None:
            return self.message(ctx, 404, f"no job {job_id!r} (any more)", back="/jobs")
        return self.render(ctx, "job.html", now=now, detail=detail, row=detail.row)

    async def workers(self, request: Request, ctx: Ctx) -> Response:
        def read() -> tuple[float, list[Presence]]:
            return self.source.clock(), self.source.workers()

        now, presences = await self.call(read)
        return self.render(ctx, "workers.html", now=now, workers=worker_views(presences, now))

    async def schedules(self, request: Request, ctx: Ctx) -> Response:
        from workerkit.scheduler.overview import to_json

        view = await self._schedule_overview()
        now = view.now if view is not None else await self.call(self.source.clock)
        data = to_json(view) if view is not None else None
        return self.render(ctx, "schedules.html", now=now, data=data)

    async def search(self, request: Request, ctx: Ctx) -> Response:
        text = (request.query_params.get("q") or "").strip()

        def read() -> tuple[float, Any]:
            found = self.source.search(text, self.options.page_size) if text else None
            return self.source.clock(), found

        now, found = await self.call(read)
        return self.render(ctx, "search.html", now=now, q=text, found=found)

    async def logout(self, request: Request, ctx: Ctx) -> Response:
        form = await read_form(request)
        if not csrf_ok(request.cookies.get(CSRF_COOKIE), form.get("csrf")):
            return self.message(ctx, 403, "refused: the form's CSRF token is missing or wrong")
        response = self.redirect(ctx, "/login")
        secure = self.secure(request)
        response.delete_cookie(
            AUTH_COOKIE, path="/", samesite="strict", httponly=True, secure=secure
        )
        return response

    async def login_endpoint(self, request: Request) -> Response:
        """The token login form: GET shows it, POST checks the token and sets the cookie."""
        credentials = self.options.credentials
        csrf = request.cookies.get(CSRF_COOKIE)
        ctx = Ctx(request, "", csrf or new_csrf_token(), csrf is None)
        target = local_path(request.query_params.get("next"), "/")
        if credentials.token is None:
            return self.finish(ctx, self.redirect(ctx, target))
        if request.method == "GET":
            return self.finish(ctx, self.render(ctx, "login.html", next=target, error=None))
        form = await read_form(request)
        target = local_path(form.get("next"), "/")
        if not csrf_ok(csrf, form.get("csrf")) or not origin_ok(
            request.headers.get("origin"), request.headers.get("host")
        ):
            return self.finish(ctx, self.message(ctx, 403, "refused: reload the login page"))
        if not credentials.token_ok(form.get("token", "")):
            log.warning("dashboard login refused", extra={"event": "dashboard_login_refused"})
            page = self.render(ctx, "login.html", status=401, next=target, error="wrong token")
            return self.finish(ctx, page)
        response = self.redirect(ctx, target)
        response.set_cookie(
            AUTH_COOKIE,
            credentials.cookie_value(),
            httponly=True,
            samesite="strict",
            secure=self.secure(request),
            path="/",
        )
        return self.finish(ctx, response)
