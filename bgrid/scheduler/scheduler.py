"""The scheduler: the one owner of jobs, operations, bot sessions and leases.

The gRPC servicers call it and map its ``bgrid.errors`` exceptions to statuses. It runs
only on the reactor thread, so it needs no locks, and every deadline is a ``callLater`` on
the injected ``IReactorTime``. All state changes go through the private methods below
``# State changes`` here and in ``bot_api``. They change records that contain only
strings, numbers, digests and protobuf messages, and report each changed record to the
journal, which commits them to the store (see ``persistence``). The queue and the other
indexes are rebuilt from those records. Timers, long polls and watches belong to the
running process.
"""

import uuid
from typing import NamedTuple

from google.rpc import code_pb2
from twisted.internet import defer
from twisted.logger import Logger

from bgrid.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from bgrid.scheduler.bot_api import BotApiMixin
from bgrid.scheduler.bots import IdleBots
from bgrid.scheduler.job import (
    COMPLETED,
    Job,
    Operation,
    cancelled_response,
    code_name,
    error_response,
    new_operation_name,
)
from bgrid.scheduler.journal import Journal, NullJournal
from bgrid.scheduler.listing import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    OperationIndex,
    decode_page_token,
)
from bgrid.scheduler.persistence import PersistenceMixin
from bgrid.scheduler.platform import normalize_properties
from bgrid.scheduler.queue import JobQueue
from bgrid.scheduler.retention import RetentionQueue
from bgrid.scheduler.store import JOBS, LEASES, META, META_NAME, OPERATIONS
from bgrid.scheduler.timeouts import LeaseTimers, action_timeout, check_action_timeout
from bgrid.scheduler.waiting import OpenSessions
from bgrid.scheduler.watch import WatchRegistry


class StoredResult(NamedTuple):
    """The outcome of a result handler that has queued a write of the result.

    ``response`` replaces the bot's ``ExecuteResponse``, or is None to keep it. ``written``
    is the Deferred of the write, queued in the scheduler store's environment, and the
    handler logs its failure itself. The job completes at once, and its completion is
    committed in the same transaction as the write or in a later one. No message shows
    the completion before ``written`` has fired, whether the write succeeded or failed.
    """

    response: object
    written: object


class Scheduler(PersistenceMixin, BotApiMixin):
    """Queues actions, leases them to bots and reports their progress as operations.

    ``clock`` is an ``IReactorTime``, and all durations are in seconds of it.
    ``result_handler(instance_name, action_digest, action, do_not_cache, execute_response)``
    is called with each result a bot reports and returns a Deferred. It may fire with a
    replacement ``ExecuteResponse``, with None to keep the original, or with a
    ``StoredResult``. The job's operations complete only after it fires.
    A bot session with no UpdateBotSession call in progress and none received for
    ``bot_keepalive_timeout`` is closed and its job requeued. A long poll lasts at most
    ``max_long_poll``. A job whose lease is lost more than ``max_job_retries`` times
    completes with UNAVAILABLE. A lease that a bot returns as CANCELLED while it reports
    status BOT_TERMINATING is requeued without counting a retry, because the bot stopped
    on purpose, and a BOT_TERMINATING session is closed at once. Done operations are
    forgotten ``operation_retention`` after they complete.

    An action runs for at most ``max_action_timeout``: an Action without a timeout is leased
    with that timeout in its payload, so the bot enforces it, and one that asks for a longer
    timeout is rejected. A
    lease still ACTIVE ``action_timeout_grace`` after its timeout is cancelled, and its job
    completes with DEADLINE_EXCEEDED without a retry, so a hung bot cannot keep a job.

    A bot can run a job when its session is of the job's instance and every
    ``(name, value)`` pair that the action requires is among the bot's platform
    properties, compared as exact strings. A name required with several values needs
    every one of them, and the bot's other properties do not matter. While no open bot
    session of the instance can run a queued job, its operations carry a
    ``NO_MATCHING_BOT`` ErrorInfo (see ``bgrid.scheduler.waiting``), recomputed when a
    session opens, closes or changes its properties. The job stays queued. GetOperation
    and ListOperations show the current reason, and a watch shows it with the next change
    of stage.

    ``store`` is an ``ISchedulerStore`` that makes the state survive a restart, or None to
    keep it in memory only. With a store, call ``recover`` before anything else, and send
    no message built from the scheduler's state (an operation, a bot session) before a
    ``durable()`` Deferred requested after it was built has fired. Watches and
    ``update_bot_session`` wait for that themselves. The store keeps clock times, so the
    clock must count from the same epoch across restarts, as the reactor's clock does.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        *,
        result_handler=None,
        bot_keepalive_timeout=60.0,
        max_long_poll=20.0,
        max_job_retries=3,
        operation_retention=3600.0,
        max_action_timeout=3600.0,
        action_timeout_grace=60.0,
        store=None,
    ):
        for option, value in [
            ("bot_keepalive_timeout", bot_keepalive_timeout),
            ("max_long_poll", max_long_poll),
            ("operation_retention", operation_retention),
            ("max_action_timeout", max_action_timeout),
        ]:
            if not value > 0:
                raise ValueError(f"{option} must be a positive number of seconds, got {value!r}")
        if not action_timeout_grace >= 0:
            raise ValueError(
                f"action_timeout_grace must be a number of seconds >= 0, got "
                f"{action_timeout_grace!r}"
            )
        if not isinstance(max_job_retries, int) or max_job_retries < 0:
            raise ValueError(f"max_job_retries must be an integer >= 0, got {max_job_retries!r}")

        self._clock = clock
        self._result_handler = result_handler
        self._bot_keepalive_timeout = bot_keepalive_timeout
        self._max_long_poll = max_long_poll
        self._max_job_retries = max_job_retries
        self._operation_retention = operation_retention
        self._max_action_timeout = max_action_timeout
        self._action_timeout_grace = action_timeout_grace
        self._stopping = False
        self._store = store
        if store is None:
            self._journal = NullJournal()
        else:
            self._journal = Journal(store, clock, self._encode_record)

        # Records: the state to be made durable.
        self._jobs = {}
        self._operations = {}
        self._sessions = {}
        self._leases = {}
        self._next_sequence = 0

        # Indexes derived from the records.
        self._unfinished_jobs = {}
        self._session_by_bot_id = {}
        self._queue = JobQueue()
        self._operation_index = OperationIndex()
        self._open_sessions = OpenSessions()
        # Queue key -> the waiting reason of the jobs queued under it.
        self._waiting_reasons = {}

        # Timers, calls and watchers of the running process.
        self._idle_bots = IdleBots()
        self._polls = {}
        self._keepalive_timers = {}
        self._retention = RetentionQueue(clock, operation_retention, self._expire_operation)
        self._lease_timers = LeaseTimers(clock, self._expire_lease)
        self._watches = WatchRegistry(self._journal.durable)
        self._ignored_leases_logged = {}

    # Execution and operations API

    def submit(self, instance_name, action_digest, action, priority=0, do_not_cache=False,
               platform=None):
        """Queue an action and return the name of a new operation for it.

        ``action_digest`` is a ``bgrid.digest.Digest`` and ``action`` the parsed
        ``re_pb2.Action``. ``platform`` is an iterable of ``(name, value)`` requirements.
        A smaller ``priority`` runs sooner. Unless ``do_not_cache`` or
        ``action.do_not_cache`` is set, the operation shares the unfinished job of an
        identical earlier submission, whose priority becomes the smaller of the two.
        Raises InvalidArgumentError for an invalid platform property or an
        ``action.timeout`` that is negative or above ``max_action_timeout``.
        """
        requirements = normalize_properties(platform or ())
        check_action_timeout(action, self._max_action_timeout)
        do_not_cache = bool(do_not_cache or action.do_not_cache)

        job = None
        if not do_not_cache:
            job_id = self._unfinished_jobs.get((instance_name, action_digest))
            job = self._jobs.get(job_id)
        created = job is None
        if created:
            job = self._create_job(
                instance_name, action_digest, action, priority, do_not_cache, requirements
            )

        operation = Operation(
            new_operation_name(instance_name),
            instance_name,
            action_digest,
            self._take_sequence(),
            job_id=job.job_id,
            stage=job.stage,
            waiting_reason=job.waiting_reason,
        )
        self._add_operation(operation)
        job.operation_names.append(operation.name)

        if created:
            self.log.info(
                "Queued job {job_id} for action {action_digest} of instance {instance_name!r} "
                "as operation {operation_name} (priority {priority})",
                job_id=job.job_id,
                action_digest=str(action_digest),
                instance_name=instance_name,
                operation_name=operation.name,
                priority=priority,
            )
            self._dispatch_job(job)
        else:
            self.log.info(
                "Attached operation {operation_name} to job {job_id} of the identical "
                "action {action_digest}",
                operation_name=operation.name,
                job_id=job.job_id,
                action_digest=str(action_digest),
            )
            if priority < job.priority:
                self._raise_priority(job, priority)
        return operation.name

    def add_completed_operation(self, instance_name, action_digest, execute_response):
        """Create a done operation for an action cache hit and return its name."""
        operation = Operation(
            new_operation_name(instance_name),
            instance_name,
            action_digest,
            self._take_sequence(),
            stage=COMPLETED,
        )
        self._add_operation(operation)
        self._complete_operation(operation, execute_response)
        return operation.name

    def get_operation(self, name):
        """Return the ``google.longrunning.Operation`` message of an operation.

        Raises NotFoundError when no operation has this name.
        """
        return self._get_operation(name).to_message()

    def watch_operation(self, name):
        """Return an ``OperationWatch`` whose ``next()`` sends the operation's changes.

        Raises NotFoundError when no operation has this name.
        """
        return self._watches.add(self._get_operation(name))

    def when_done(self, name):
        """Return a Deferred firing with None once the operation is done, or the scheduler stops.

        Unlike a watch, it does not wait until the completion is durable, so it suits
        state that a restart drops anyway, such as the pins of the operation's inputs.
        Raises NotFoundError when no operation has this name.
        """
        return self._watches.when_done(self._get_operation(name))

    def cancel_operation(self, name):
        """Complete an operation with status CANCELLED, unless it is done already.

        The job stops only when no other operation is waiting for it. A queued job leaves
        the queue, and the lease of a running job becomes CANCELLED so that its bot stops it.
        Raises NotFoundError when no operation has this name.
        """
        operation = self._get_operation(name)
        if operation.done:
            return
        self.log.info("Cancelled operation {operation_name}", operation_name=name)
        self._complete_operation(operation, cancelled_response(name))

        job = self._jobs.get(operation.job_id)
        if job is not None and not job.done and not self._waiting_operations(job):
            self._cancel_job(job)

    def delete_operation(self, name):
        """Forget a done operation.

        Raises NotFoundError when no operation has this name, and FailedPreconditionError
        when it is not done. A client deletes a running operation by cancelling it first.
        """
        operation = self._get_operation(name)
        if not operation.done:
            raise FailedPreconditionError(
                f"operation {name} is not done: cancel it first, or wait until it completes"
            )
        self._forget_operation(name)

    def list_operations(self, instance_name, page_size=0, page_token=""):
        """Return a page of the instance's operations and the token of the next page.

        Operations are in creation order. A ``page_size`` of 0 means the default of
        ``DEFAULT_PAGE_SIZE``, and larger sizes are cut to ``MAX_PAGE_SIZE``. The next page
        token is "" on the last page. Raises InvalidArgumentError for a negative page size or
        a token that ``list_operations`` did not return.
        """
        if page_size < 0:
            raise InvalidArgumentError(f"invalid page_size {page_size}: must not be negative")
        page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token) if page_token else -1
        names, next_token = self._operation_index.page(instance_name, after, page_size)
        return [self._operations[name].to_message() for name in names], next_token

    def stats(self):
        """Return counts of the scheduler's records, for metrics and status pages.

        ``jobs`` counts the unfinished jobs, because a job is forgotten once it is done and
        its operations keep its response.
        """
        return {
            "jobs": len(self._jobs),
            "queued_jobs": len(self._queue),
            "operations": len(self._operations),
            "bot_sessions": len(self._sessions),
            "idle_bots": len(self._idle_bots),
            "leases": len(self._leases),
        }

    def stop(self):
        """Return every long poll, fail every watch, cancel every timer and write the records.

        Call it when the server stops, before the store closes. Records are kept as they
        are. Returns a Deferred firing with None once the last changes are committed or
        their commit failed, which is logged.
        """
        self._stopping = True
        for name in list(self._polls):
            self._end_poll(name)
        for timer in self._keepalive_timers.values():
            if timer.active():
                timer.cancel()
        self._keepalive_timers.clear()
        self._lease_timers.stop_all()
        self._retention.stop()
        self._watches.fail_all(
            UnavailableError("the server is stopping. Retry with WaitExecution")
        )
        self.log.info(
            "Scheduler stopped with {jobs} jobs, {queued} queued, and {sessions} bot sessions",
            jobs=len(self._jobs),
            queued=len(self._queue),
            sessions=len(self._sessions),
        )
        return self._journal.stop()

    # Lookups and validation

    def _get_operation(self, name):
        operation = self._operations.get(name)
        if operation is None:
            raise NotFoundError(f"operation {name!r} not found")
        return operation

    def _waiting_operations(self, job):
        return [
            name for name in job.operation_names if not self._operations[name].done
        ]

    def _action_timeout(self, job):
        """Return the seconds that the job's action may run for on a bot."""
        return action_timeout(job.action, self._max_action_timeout)

    def _take_sequence(self):
        sequence = self._next_sequence
        self._next_sequence += 1
        self._journal.changed(META, META_NAME)
        return sequence

    # State changes: jobs and operations

    def _create_job(self, instance_name, action_digest, action, priority, do_not_cache,
                    requirements):
        job = Job(
            uuid.uuid4().hex,
            instance_name,
            action_digest,
            action,
            priority=priority,
            do_not_cache=do_not_cache,
            requirements=requirements,
            sequence=self._take_sequence(),
            queued_time=self._clock.seconds(),
        )
        self._jobs[job.job_id] = job
        self._journal.changed(JOBS, job.job_id)
        if not do_not_cache:
            self._unfinished_jobs[job.dedup_key] = job.job_id
        return job

    def _raise_priority(self, job, priority):
        job.priority = priority
        self._journal.changed(JOBS, job.job_id)
        if job.job_id in self._queue:
            self._queue.reprioritize(job.job_id, priority)

    def _add_operation(self, operation):
        self._operations[operation.name] = operation
        self._journal.changed(OPERATIONS, operation.name)
        self._operation_index.add(operation.instance_name, operation.sequence, operation.name)

    def _complete_operation(self, operation, response, response_data=None):
        """Complete an operation with ``response``, an ExecuteResponse.

        ``response_data`` is its serialization, when the caller has it already.
        """
        if response_data is None:
            response_data = response.SerializeToString()
        operation.response_data = response_data
        operation.stage = COMPLETED
        operation.waiting_reason = None
        operation.completed_time = self._clock.seconds()
        self._journal.changed(OPERATIONS, operation.name)
        if not self._stopping:
            self._retention.add(operation.name, operation.completed_time)
        self._watches.publish(operation)

    def _expire_operation(self, name):
        if name not in self._operations:
            return
        self.log.debug("Forgot operation {operation_name} after its retention period",
                       operation_name=name)
        self._forget_operation(name)

    def _forget_operation(self, name):
        operation = self._operations.pop(name)
        self._journal.changed(OPERATIONS, name)
        self._operation_index.remove(operation.instance_name, operation.sequence)
        job = self._jobs.get(operation.job_id)
        if job is not None:
            job.operation_names.remove(name)

    def _forget_done_job(self, job):
        """Delete a done job. Its operations are done and keep their responses.

        Done operations stay for the retention period, so keeping their job, its Action
        and a second copy of the response would cost memory for as long.
        """
        if job.done:
            del self._jobs[job.job_id]
            self._journal.changed(JOBS, job.job_id)

    def _forget_unfinished(self, job):
        if self._unfinished_jobs.get(job.dedup_key) == job.job_id:
            del self._unfinished_jobs[job.dedup_key]

    def _set_job_stage(self, job, stage):
        job.stage = stage
        # Reported before the watches hear of it, so their durable() wait includes it.
        self._journal.changed(JOBS, job.job_id)
        for name in job.operation_names:
            operation = self._operations[name]
            if not operation.done:
                operation.stage = stage
                self._watches.publish(operation)

    def _dispatch_job(self, job):
        """Lease a queued job to the longest-waiting idle bot that can run it, or queue it."""
        session_name = self._idle_bots.pick(job.instance_name, job.requirements)
        if session_name is None:
            self._enqueue(job)
            return
        self._assign(job, self._sessions[session_name])
        self._end_poll(session_name)

    def _enqueue(self, job):
        """Put a job in the queue and give it the waiting reason of its queue key."""
        self._queue.push(
            job.job_id, job.instance_name, job.requirements, job.priority, job.sequence
        )
        key = (job.instance_name, job.requirements)
        if key not in self._waiting_reasons:
            self._waiting_reasons[key] = self._open_sessions.waiting_reason(*key)
        self._set_waiting_reason(job, self._waiting_reasons[key])

    def _refresh_waiting_reasons(self):
        """Recompute the waiting reason of every queue key after the open sessions changed.

        Only the jobs of keys whose reason changed are touched.
        """
        reasons = {}
        for key in self._queue.keys():
            reason = self._open_sessions.waiting_reason(*key)
            reasons[key] = reason
            if key in self._waiting_reasons and self._waiting_reasons[key] == reason:
                continue
            for job_id in self._queue.job_ids(key):
                self._set_waiting_reason(self._jobs[job_id], reason)
        self._waiting_reasons = reasons

    def _set_waiting_reason(self, job, reason):
        """Set the waiting reason of a job and its operations.

        Watches are not woken for it: they send the latest reason with the next stage.
        """
        if job.waiting_reason == reason:
            return
        job.waiting_reason = reason
        for name in job.operation_names:
            operation = self._operations[name]
            if not operation.done:
                operation.waiting_reason = reason

    def _handle_result(self, job, response):
        """Pass a bot's result through the result handler, then complete the job.

        The result is stored in the job until the job completes, so that after a restart
        ``recover`` passes it to the handler again.
        """
        job.finishing = True
        job.reported_response = response
        self._journal.changed(JOBS, job.job_id)
        if self._result_handler is None:
            self._complete_job(job.job_id, response)
            return

        def handled(outcome):
            if not isinstance(outcome, StoredResult):
                self._complete_job(job.job_id, response if outcome is None else outcome)
                return
            # The handler's write is queued, so the completion joins it in one store
            # transaction, or follows it, instead of waiting a whole commit for it.
            # NOTE: an identical action submitted from now until the write commits finds
            # neither this job nor the cached result, so it runs again.
            self._journal.include(outcome.written)
            replacement = outcome.response
            self._complete_job(job.job_id, response if replacement is None else replacement)
            # The journal logs a failed commit itself.
            self._journal.flush().addErrback(lambda _failure: None)

        def handler_failed(failure):
            self.log.failure(
                "Result handler failed for job {job_id} (action {action_digest}), so its "
                "operations complete with the unhandled response",
                failure,
                job_id=job.job_id,
                action_digest=str(job.action_digest),
            )
            self._complete_job(job.job_id, response)

        deferred = defer.maybeDeferred(
            self._result_handler,
            job.instance_name,
            job.action_digest,
            job.action,
            job.do_not_cache,
            response,
        )
        deferred.addCallbacks(handled, handler_failed)
        deferred.addErrback(
            lambda failure: self.log.failure(
                "Failed to complete job {job_id}", failure, job_id=job.job_id
            )
        )

    def _complete_job(self, job_id, response):
        job = self._jobs.get(job_id)
        if job is None or job.done:
            self.log.warn("Ignored a second completion of job {job_id}", job_id=job_id)
            return
        job.stage = COMPLETED
        job.finishing = False
        job.reported_response = None
        job.response = response
        self._journal.changed(JOBS, job_id)
        self._forget_unfinished(job)
        self.log.info(
            "Completed job {job_id} with status {code} for operations {operation_names}",
            job_id=job_id,
            code=code_name(response.status.code),
            operation_names=self._waiting_operations(job),
        )
        response_data = response.SerializeToString()
        for name in list(job.operation_names):
            operation = self._operations[name]
            if not operation.done:
                self._complete_operation(operation, response, response_data)
        self._forget_done_job(job)

    def _cancel_job(self, job):
        """Stop a job that no operation is waiting for any more."""
        if job.finishing:
            # The bot is done and the result handler runs. Letting it finish stores a
            # result that identical submissions can still attach to and use.
            return
        lease = self._leases[job.lease_id] if job.lease_id is not None else None
        if lease is not None:
            # First, so that an illegal transition raises before anything has changed.
            lease.cancel()
            self._journal.changed(LEASES, lease.lease_id)
            self._lease_timers.stop(lease.lease_id)
        self._forget_unfinished(job)
        self._queue.remove(job.job_id)
        job.waiting_reason = None
        job.lease_id = None
        job.stage = COMPLETED
        job.response = error_response(
            code_pb2.CANCELLED, f"job {job.job_id} was cancelled by all of its operations"
        )
        self._journal.changed(JOBS, job.job_id)
        self._forget_done_job(job)
        if lease is not None:
            self._send_cancellation(lease)
