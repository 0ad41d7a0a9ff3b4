"""The one workerkit runtime of a Celery worker process: its state, the drain, the release.

Every hook workerkit puts into Celery (the consumer bootstep, the signals, the Worker subclass,
the task wrappers, the Request subclass) is given the :class:`Runtime` when it is built, so no
module global holds it. Pool children are forked from the main process after the runtime was
built: they inherit it, and a fork hook drops what belongs to one process only (its event
sender, its Redis connection); the drain, release and keeper parts run in the main process only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from workerkit import events as events_module
from workerkit.engines.attempt import HEALTH_EVERY, HEARTBEAT_EVERY, Duty, Keeper, release_each
from workerkit.engines.celery.dashboard_worker import WorkerDashboard
from workerkit.engines.celery.delivery import (
    in_pool,
    keep_written_jobs,
    lease_at_delivery,
    pool_pids,
    remember_client_ids,
    seal,
)
from workerkit.engines.celery.lease import LeaseClock, Watchdog, now
from workerkit.engines.celery.ledger import Ledger
from workerkit.engines.celery.poison import dead_key, dead_record, describe, guard_deliveries
from workerkit.engines.celery.pop import InFlight, recover_in_flight, reliable_pop
from workerkit.engines.lifeline import Lifeline
from workerkit.events import (
    BATCH_DELAY,
    BatchingSender,
    Heartbeat,
    JobFinished,
    PayloadRefused,
    QueueStats,
    StoreHealth,
    WorkerReady,
    WorkerStopping,
)
from workerkit.job import request_stop_all
from workerkit.proctree import descendants, stop_processes

if TYPE_CHECKING:
    from workerkit.settings import Settings

__all__ = ("DRAIN_TICK", "RECOVERY_GRACE", "Runtime")

log = logging.getLogger("workerkit.engines.celery")

DRAIN_TICK: Final = 0.02
#: How long a release waits for the consumer to stop taking messages (within the orphan's
#: 0.9 s hard exit, workerkit/engines/lifeline.py).
SEAL_WITHIN: Final = 0.3
#: Between SIGTERM and SIGKILL for the subprocesses of tasks whose pool child was killed.
TASK_CHILDREN_GRACE: Final = 0.2
#: The least a worker waits after a broker outage before it recovers others' messages.
RECOVERY_GRACE: Final = 3.0


class Runtime:
    """workerkit inside one Celery worker process: settings, events, ledger, held messages.

    Built once in the worker's main process (:func:`workerkit.engines.celery.worker.install`).
    In every process that runs tasks: the settings, the stop flag, the per-task event sender
    and the ledger. In the main process only: the messages it holds, the drain after SIGTERM,
    the release, and the keeper thread (heartbeats, health, leases, crash recovery).
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.window = settings.recovery_window
        self.lease_ttl = self.window / 2
        #: Until when this worker's leases live, shared with its pool children (lease.py).
        self.lease = LeaseClock(self.lease_ttl)
        #: A prefork pool child's watchdog (started by :meth:`start_watchdog`), else None.
        self.watchdog: Watchdog | None = None
        # The main process's id: leases are its, also for messages its pool children run.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.events = events_module.client("celery-worker")
        #: Set once the supervisor asked this process's jobs to stop: a task starting later
        #: starts with stop_requested already true.
        self.stop_requested = threading.Event()
        #: This process's per-task event sender, made at its first task (:meth:`open_task_events`).
        self.task_events: BatchingSender | None = None
        #: Celery Request classes made for this runtime, by their base class (see task.py).
        self.request_classes: dict[type[Any], type[Any]] = {}
        self._ledger: Ledger | None = None
        #: The task consumer's in-flight lists (pop.py), once it has a Redis channel.
        self.flight: InFlight | None = None
        self.dashboard = WorkerDashboard(settings, app)
        self._ledger_lock = threading.Lock()
        self.consumer: Any = None
        self.draining = False
        self._held: dict[str, Any] = {}  # tag -> Request, every message this worker holds
        self._held_lock = threading.Lock()
        self._handed_back: set[str] = set()
        self._waiting: list[Any] = []  # new work, while the lease deadline is stale (gate)
        self._gate: Callable[[Any], None] | None = None  # attach() sets it
        self._consumer_starts = 0  # a second start is a reconnection
        self._wake_r, self._wake_w = os.pipe()
        self._release_lock = threading.Lock()
        self._started = False  # worker_ready was handled
        self._start_lock = threading.Lock()
        self._last_settled = 0.0  # monotonic time of the last message settled (forget())
        #: After a failed keeper step (the broker unreachable), recovery waits this long: at
        #: least two lease renewals and several retries of a pending settle (outage.py).
        self.recovery_grace = max(RECOVERY_GRACE, self.window / 3)
        self._recover_after = 0.0
        _forget_in_forked_child(self)

    # --- what each process has of its own -------------------------------------------------

    def open_task_events(self) -> BatchingSender:
        """This process's per-task event sender (a forked pool child makes its own); the main
        process flushes it before its own last events and before it exits."""
        current = self.task_events
        if current is None:
            client = events_module.client("celery-executor")
            current = self.task_events = BatchingSender(client)
        return current

    @property
    def ledger(self) -> Ledger:
        """This process's ledger (a forked pool child opens its own Redis connection)."""
        with self._ledger_lock:
            if self._ledger is None:
                self._ledger = Ledger(self.app)
            return self._ledger

    def flush_events(self) -> None:
        current = self.task_events  # never the parent's in a forked child (the fork hook)
        if current is not None:
            current.flush()

    def on_executor_command(self, command: str, message: Mapping[str, Any]) -> None:
        """A command for the jobs that run in this process (a pool child, or solo/threads)."""
        if command == "request_stop":
            self.stop_requested.set()
            request_stop_all()

    def after_fork_in_child(self) -> None:
        # A forked pool child must not write into its parent's event buffer and connection,
        # nor share its Redis connection, nor inherit a lock another thread held at the fork.
        # Dropping them at fork spares every task an os.getpid() (a system call).
        self.task_events = None
        self.watchdog = None
        self._ledger = None
        self._ledger_lock = threading.Lock()

    def start_watchdog(self) -> None:
        """In a prefork pool child: stop its task before the worker's leases can expire."""
        self.watchdog = Watchdog(self.lease)
        self.watchdog.start()

    # --- hooks from Celery ----------------------------------------------------------------

    def attach(self, consumer: Any) -> None:
        """Called as the consumer is built: gate its dispatch to the pool."""
        self.consumer = consumer
        dispatch = consumer.on_task_request

        def gate(request: Any) -> None:
            # Runs on the consumer's loop thread. After SIGTERM nothing new starts: a message
            # that arrives, or whose ETA comes, is handed back instead.
            if self.draining:
                self._hand_back(request)
                return
            if getattr(request, "_workerkit_lost", False):
                self._drop(request)  # another worker holds it now (an ETA that waited)
                return
            if self.lease.expiring() and pool_pids(consumer):
                # A stale shared deadline (after a SIGSTOP, a failed renewal round) would have
                # a pool child stop the task at once: it waits for the next round.
                self._waiting.append(request)
                return
            request._workerkit_dispatched = True  # it may run from now on (see _renew_leases)
            dispatch(request)

        self._gate = gate
        consumer.on_task_request = gate

    def on_consumer_start(self, consumer: Any) -> None:
        """Each time the consumer (re)starts: its deliveries take their lease at once, and
        after a lost connection the messages Celery dropped unstarted go back to the queue."""
        channel = getattr(consumer.task_consumer, "channel", None)
        qos = getattr(channel, "qos", None)
        if qos is not None and hasattr(qos, "unacked_key"):
            prefix = str(getattr(channel, "global_keyprefix", "") or "")
            if self.flight is None:
                paused = self.dashboard.paused
                self.flight = InFlight(self.worker_id, self.lease_ttl, prefix, paused)
            lease_at_delivery(qos, self.worker_id, self.lease_ttl, self.flight)
            guard_deliveries(channel, self.dead_letter, prefix=prefix)
            reliable_pop(channel, self.flight, self.dead_letter)
            remember_client_ids(channel)
        keep_written_jobs(getattr(consumer, "pool", None))
        self._consumer_starts += 1
        # Off on purpose (config.py): Celery's notice that it turns on in Celery 6 is not for
        # the user. Here, after Celery's logging setup put its "always" filters in front.
        warnings.filterwarnings("ignore", message=r"\s*In Celery 5\.1 we introduced an optional")
        if self._consumer_starts > 1:
            self._after_reconnect()

    def _after_reconnect(self) -> None:
        """The consumer restarted after a lost broker connection (on the loop thread).

        kombu restores nothing as the old channel closes (delivery.py). Celery kept the tasks
        its pool accepted (they run on, their leases renewed, and settle by the fenced ack)
        and dropped the others (waiting for a pool slot, an ETA, a rate limit): back they go.
        """
        from celery.worker import state

        prefork = bool(pool_pids(self.consumer))
        active = set(state.active_requests)
        self._waiting = []  # held, never dispatched: given back below
        for request in self._in_hand():
            if getattr(request, "_workerkit_settling", False) or request in active:
                continue
            if getattr(request, "_workerkit_dispatched", False) and (
                not prefork or in_pool(self.consumer, request)
            ):
                continue  # in a child's pipe; solo runs it in the loop; a threads pool's queue
            self._hand_back(request, reconnected=True)

    def _dispatch_waiting(self) -> None:
        """On the loop thread, after a lease round advanced the deadline: the waiting work."""
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            if not request.acknowledged and self._gate is not None:
                self._gate(request)

    def dead_letter(
        self, queue: str, raw: bytes, reason: str, taken_from: str | None = None
    ) -> None:
        """A queue entry kombu cannot read (poison.py): to the queue's dead-letter list (out
        of the in-flight list ``taken_from`` in the same step)."""
        record = dead_record(queue, raw, reason, self.worker_id)
        key = dead_key(queue)
        fields: dict[str, Any] = {"queue": queue, "reason": reason, "dead_letter": key}
        try:
            if taken_from is not None and self.flight is not None:
                if not self.flight.refuse(self.ledger.client, taken_from, raw, key, record):
                    return  # back in its queue meanwhile: refused at its next pop
            else:
                self.ledger.client.rpush(key, record)
        except Exception as exc:  # never lost without a trace: the whole entry is logged
            fields.update(dead_letter=None, error=str(exc), record=record)
        log.error(
            "queue entry refused: not a message kombu can read; dead-lettered",
            extra={"event": "queue_entry_dead_lettered", "entry": describe(raw), **fields},
        )
        self.events.send(PayloadRefused(describe(raw), queue, "undecodable"))

    def hold(self, request: Any) -> None:
        """A message reached this worker (its Request was built): it is held until settled."""
        tag = self._tag(request)
        if tag is None:
            return
        request._workerkit_tag = tag  # for forget(), once per message
        with self._held_lock:
            self._held[tag] = request
        # A message that came in after SIGTERM and waits for an ETA would never reach the gate
        # before we exit: hand it back now (the gate does it for the others).
        if self.draining and request.eta:
            self._hand_back(request)

    def forget(self, request: Any) -> None:
        """The message left this worker's hands (acknowledged or requeued): stop holding it.

        Done at once rather than by the keeper's next prune: a Request kept a few seconds
        longer survives into the garbage collector's old generations, and at a thousand
        messages a second those thousands of live objects made every full collection (and so
        every task) slower.
        """
        self._last_settled = time.monotonic()
        tag = getattr(request, "_workerkit_tag", None)
        if tag is not None:
            with self._held_lock:
                # Only this request: a redelivery of the message to this worker (the same
                # delivery tag) may hold the entry by now.
                if self._held.get(tag) is request:
                    del self._held[tag]

    def on_worker_ready(self) -> None:
        with self._start_lock:
            if self._started or self.draining:
                return  # a SIGTERM came first: the drain thread is stopping this worker
            self._started = True
        # Nothing was consumed before: a message delivered from now on has a lease that lives
        # at least lease_ttl past this instant (it takes it at delivery).
        self.lease.extend(now())
        self.events.send(WorkerReady("celery", self._queues(), self._concurrency(), self.worker_id))
        Keeper(
            self._duties(), log=log, name="workerkit-keeper", on_error=self._keeper_failed
        ).start()
        log.info(
            "celery worker ready",
            extra={"event": "worker_ready", "worker": self.worker_id, "window": self.window},
        )

    def install_signal_handlers(self) -> None:
        # Replaces Celery's handlers (installed just before): Celery's warm shutdown joins the
        # pool with no bound, and its SIGINT handler turns a second Ctrl-C into a cold shutdown.
        # The handler only writes a byte to a pipe: it runs between two bytecodes of whatever
        # the main thread was doing (kombu's event loop, or the task itself in the solo pool),
        # so it must not take locks or touch the broker connection.
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Listening from here, not from worker_ready: a SIGTERM while Celery still connects to
        # the broker (kombu's retry loop, which can last minutes) must stop the worker at once.
        self.events.on_command(self._on_command)
        self.dashboard.install_presence(self.events)
        threading.Thread(target=self._control, name="workerkit-drain", daemon=True).start()
        # The supervisor's death, or SIGQUIT (Celery's cold shutdown, which would leave every
        # message to the visibility timeout): the release deadline, at once.
        Lifeline(self._release_all).start()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"T")

    # --- the drain ------------------------------------------------------------------------

    def _control(self) -> None:
        os.read(self._wake_r, 1)
        with self._start_lock:
            self.draining = True
            ready = self._started
        held = self._in_hand()
        self.events.send(WorkerStopping(len(held)))
        if not ready and not held:
            # Still starting: the main thread may be in kombu's connect-retry loop, where no
            # hub callback runs, and no message was consumed yet (Celery's worker_ready comes
            # before its loop's first read). Nothing to drain or hand back: exit from here.
            log.info(
                "stopped before the worker was ready",
                extra={"event": "worker_stopping", "running": 0, "ready": False},
            )
            self._exit_now()
        log.info("stopped consuming", extra={"event": "worker_stopping", "running": len(held)})
        self._on_loop(self._stop_consuming)
        while True:
            if not self._in_hand():
                self._on_loop(self._exit_now)
                time.sleep(1.0)  # the loop may be busy with a solo task's last ack
                self._exit_now()
            time.sleep(DRAIN_TICK)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the consumer's loop thread (from another thread): kombu's in-memory
        state is the loop's. Directly when there is no loop (yet, or any more)."""
        self._on_loop(fn)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        hub = getattr(self.consumer, "controller", None)
        hub = getattr(hub, "hub", None)
        if hub is not None:
            hub.call_soon(fn)  # wakes the loop (kombu's hub has a waker for other threads)
        else:
            fn()

    def _stop_consuming(self) -> None:
        consumer = self.consumer
        if consumer is not None and consumer.task_consumer is not None:
            with contextlib.suppress(Exception):
                consumer.task_consumer.cancel()
        # Messages waiting for their ETA (or a rate limit) were never given to the pool: hand
        # them back. Those given to the pool are in hand and may finish.
        from celery.worker import state

        waiting, self._waiting = self._waiting, []
        for request in [*state.scheduled_requests, *waiting]:
            self._hand_back(request)

    def _hand_back(self, request: Any, *, reconnected: bool = False) -> None:
        """Put a message that will not run here back in its queue, fenced by our lease.

        Draining: one that cannot be (the broker gone) stays held, for the release. After a
        reconnection (``reconnected``): let go of at once, even then (Celery dropped it; its
        lease expires into crash recovery), and its tag may be delivered here again later.
        """
        tag = self._tag(request)
        if tag is None or tag in self._handed_back or request.acknowledged:
            return
        if not reconnected:
            self._handed_back.add(tag)
        timer_entry = getattr(request, "_eta_timer_entry", None)
        if timer_entry is not None:
            with contextlib.suppress(Exception):
                timer_entry.cancel()
        try:
            restored: bool | None = self.ledger.restore(tag, owners=(self.worker_id,))
        except Exception as exc:
            log.warning(
                "cannot hand a message back; crash recovery will",
                extra={"event": "hand_back_failed", "job_id": request.id, "error": str(exc)},
            )
            if not reconnected:
                return
            restored = None
        # Celery must not ack or reject it later: the message is the queue's again.
        request.acknowledged = True
        request._workerkit_lost = reconnected  # were it run after all, it would not settle
        with contextlib.suppress(Exception):
            request.message._state = "REQUEUED"
        from celery.worker import state

        with contextlib.suppress(Exception):
            state.task_ready(request)
        if reconnected:
            self.forget(request)
        log.info(
            "handed a message back to its queue",
            extra={
                "event": "message_handed_back",
                "job_id": request.id,
                "restored": restored,
                "reconnected": reconnected,
            },
        )

    def _in_hand(self) -> list[Any]:
        with self._held_lock:
            for tag, request in list(self._held.items()):
                if request.acknowledged or tag in self._handed_back:
                    del self._held[tag]
            return list(self._held.values())

    def _exit_now(self) -> None:
        if self._in_hand():
            return
        self.flush_events()
        self.dashboard.close()
        if pool_pids(self.consumer):
            # Pool children write their last job_finished events within BATCH_DELAY of them;
            # the acks (and so forget()) happen here in the main process, right after.
            time.sleep(max(0.0, self._last_settled + BATCH_DELAY * 1.5 - time.monotonic()))
        self._kill_pool()
        log.info("drained", extra={"event": "worker_drained"})
        logging.shutdown()
        os._exit(0)

    def _kill_pool(self) -> list[int]:
        pids = pool_pids(self.consumer)
        # The tasks' subprocesses end with their attempt: found before the children die (then
        # they are re-parented), stopped each by pid once the children are gone.
        tree = [each for pid in pids for each in descendants(pid)]
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if tree:
            stop_processes(tree, grace=TASK_CHILDREN_GRACE)
        return pids

    # --- commands -------------------------------------------------------------------------

    def _on_command(self, command: str, message: Mapping[str, Any]) -> None:
        if command == "request_stop":
            self.on_executor_command(command, message)  # jobs of the threads and solo pools
            log.info("stop requested for running jobs", extra={"event": "jobs_stop_requested"})
        elif command == "release":
            self._release_all()

    def _release_all(self) -> None:
        """The release deadline: kill what runs, put every message in hand back, exit 0."""
        with self._release_lock:
            self.draining = True
            sealed = seal(self.consumer, self.ledger, self._stop_consuming, SEAL_WITHIN)
            if not sealed:
                log.warning(
                    "the consumer may still pop messages: they stay unacknowledged, for crash "
                    "recovery once their leases expire",
                    extra={"event": "release_unsealed"},
                )
            elif self.flight is not None:  # what a lost pop reply left in flight
                with contextlib.suppress(Exception):
                    self.flight.give_back(self.ledger.client)
            # Kill the pool children first: a message must not be back in its queue (where
            # another worker can start it) while its first run still goes on. Jobs of the solo
            # and threads pools run in this process and end with it, a moment later; their
            # checkpoint writes are fenced by the next attempt's token.
            killed = self._kill_pool()
            # A solo or threads job's job_started may still be in the buffer: it must reach
            # the supervisor before the job_finished "released" below.
            self.flush_events()
            ledger = self.ledger

            def release(request: Any) -> bool:
                tag = self._tag(request)
                if tag is None:
                    return False
                if getattr(request, "_workerkit_settling", False):
                    # Finished: its fenced ack is being retried (outage.py). Restoring it would
                    # run it again; left in ``unacked``, the retried ack lands or, if the worker
                    # is gone first, crash recovery redelivers it after its lease.
                    return False
                ok = sealed and ledger.restore(tag, owners=(self.worker_id,))
                queue = str(request.delivery_info.get("routing_key") or "")
                self.events.send(JobFinished(str(request.id), request.name, queue, "released", 0.0))
                return ok

            released = release_each(
                self._in_hand(),
                release,
                log=log,
                skip_on=(Exception,),
                skip_message="cannot release a message; crash recovery will",
                fields=_job_id,
            ).released
            log.info(
                "released unfinished jobs",
                extra={"event": "worker_released", "released": released, "killed": killed},
            )
            logging.shutdown()
            os._exit(0)

    # --- the keeper: heartbeats, health, leases, crash recovery ----------------------------

    def _duties(self) -> list[Duty]:
        # Nothing here runs per task: each duty at its own cadence, the first pass at once.
        return [
            Duty("leases", max(0.2, self.window / 6), self._renew_leases),
            Duty("heartbeat", HEARTBEAT_EVERY, self._heartbeat),
            Duty("health", HEALTH_EVERY, self._report_health),
            Duty("recovery", max(0.5, self.window / 4), self._recover, when=self._recovering),
        ]

    def _keeper_failed(self, duty: Duty, exc: Exception) -> None:
        # The broker is unreachable (or was): no crash recovery until it has answered for a
        # while. Every lease may have expired meanwhile; the workers that hold those messages
        # renew them, and land their retried acks (outage.py), first.
        self._recover_after = time.monotonic() + self.recovery_grace
        log.warning("keeper step failed", extra={"event": "keeper_failed", "error": str(exc)})
        self.events.send(StoreHealth(ok=False, reason=f"broker: {type(exc).__name__}"))

    def _renew_leases(self) -> None:
        """Renew the leases in hand; advance the pool's deadline only when none was lost. A lost
        lease (its message restored by another worker after our lease expired, e.g. while this
        process was stopped) is never taken back: a message not started yet is dropped, a running
        one is left to its pool child's watchdog, which stops it at the deadline that stops
        advancing here until that run is settled (fenced) and forgotten."""
        started = now()
        held = self._in_hand()
        renewing = {
            tag: request
            for request in held
            if not getattr(request, "_workerkit_lost", False)
            and (tag := self._tag(request)) is not None
        }
        if self.flight is not None:
            self.flight.keep_alive(self.ledger.client)
        lost = self.ledger.renew_leases(list(renewing), self.worker_id, self.lease_ttl)
        for tag in lost:
            request = renewing[tag]
            if (
                request.acknowledged
                or getattr(request, "_workerkit_settling", False)
                or getattr(request, "_workerkit_writing", False)
            ):
                # Its settle (ack.lua, or the requeue's restore) ran during this round: it left
                # ``unacked`` by our own hand, before the loop marked it acknowledged.
                continue
            request._workerkit_lost = True
            log.warning(
                "lease lost: another worker holds the message now",
                extra={"event": "lease_lost", "job_id": request.id, "tag": tag},
            )
            if not getattr(request, "_workerkit_dispatched", False):
                # Never given to the pool: it will not start here. Celery's and kombu's state
                # belong to the consumer's loop thread: dropped there.
                self._on_loop(functools.partial(self._drop, request))
        stale = [r for r in self._in_hand() if getattr(r, "_workerkit_lost", False)]
        left = self.lease.left()
        if stale and left is not None and left < 0:
            # Past the frozen deadline every pool child's watchdog has killed its run (at
            # kill_at before it): no run of these goes on. A lost message whose settle never
            # comes (Celery gives up a late ack after a broker connection loss) must not keep
            # the deadline frozen: every later run here would be stopped at once, counted as
            # a crash, and failed as poison after max_attempts.
            for request in stale:
                self.forget(request)
                log.warning(
                    "a lost message was never settled: let go of it",
                    extra={"event": "lease_lost_forgotten", "job_id": request.id},
                )
            stale = []
        if not stale:
            self.lease.extend(started)
            if self._waiting:
                self._on_loop(self._dispatch_waiting)

    def _drop(self, request: Any) -> None:
        """Let go of a message whose lease is lost: it must not start here, nor be settled.

        On the consumer's loop thread (the gate, or handed over by the keeper), as Celery's
        own request bookkeeping is.
        """
        if request.acknowledged or getattr(request, "_workerkit_dispatched", False):
            return  # dropped already, or given to the pool meanwhile (its watchdog stops it)
        self._cancel_eta(request)
        request.acknowledged = True
        with contextlib.suppress(Exception):
            request.message.channel.qos._quick_ack(request.message.delivery_tag)
            request.message._state = "REQUEUED"
        from celery.worker import state

        with contextlib.suppress(Exception):
            state.task_ready(request)
        self.forget(request)

    def _cancel_eta(self, request: Any) -> None:
        """Cancel the ETA timer of a request still waiting for it, and give back the prefetch
        slot Celery took for it (its timer's callback would have, as it fires)."""
        from celery.worker import state

        if request not in state.scheduled_requests:
            return  # no ETA, or its timer fired already (Celery gave the slot back then)
        entry = getattr(request, "_eta_timer_entry", None)
        if entry is None or entry.canceled:
            return
        with contextlib.suppress(Exception):
            entry.cancel()
            self.consumer.qos.decrement_eventually()

    def _heartbeat(self) -> None:
        self.events.send(Heartbeat(running=len(self._in_hand())))

    def _recovering(self) -> bool:
        # After SIGTERM the worker leaves recovery to the others; after a broker outage it
        # waits (see _keeper_failed).
        return not self.draining and time.monotonic() >= self._recover_after

    def _report_health(self) -> None:
        ledger = self.ledger
        ledger.ping()
        self.events.send(StoreHealth(ok=True, reason="ok"))
        with contextlib.suppress(Exception):
            self.events.send(QueueStats(depth=ledger.depths(self._queues()), oldest_ready_age={}))

    def _recover(self) -> None:
        ledger = self.ledger
        recover_in_flight(ledger.client, ledger.prefix, self.lease_ttl)  # never raises
        for tag in ledger.abandoned(time.time() - self.lease_ttl):
            task_id = ledger.task_id_of(tag)
            # The owner died: the run (if it had started) counts as an attempt.
            if ledger.restore(tag, crashed=True):
                log.warning(
                    "restored the message of a worker that died",
                    extra={"event": "message_recovered", "job_id": task_id, "tag": tag},
                )

    # --- helpers --------------------------------------------------------------------------

    @staticmethod
    def _tag(request: Any) -> str | None:
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        return str(tag) if tag is not None else None

    def _queues(self) -> tuple[str, ...]:
        consumer = self.consumer
        with contextlib.suppress(Exception):
            return tuple(q.name for q in consumer.task_consumer.queues)
        return tuple(self.settings.queues or (self.app.conf.task_default_queue,))

    def _concurrency(self) -> int:
        with contextlib.suppress(Exception):
            return int(self.consumer.pool.num_processes)
        return self.settings.concurrency


def _forget_in_forked_child(runtime: Runtime) -> None:
    """Run ``runtime.after_fork_in_child`` in every forked child, while the runtime lives."""
    ref = weakref.ref(runtime)

    def after_in_child() -> None:
        current = ref()
        if current is not None:
            current.after_fork_in_child()

    os.register_at_fork(after_in_child=after_in_child)


def _job_id(request: Any) -> dict[str, Any]:
    return {"job_id": request.id}
