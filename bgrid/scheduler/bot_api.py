"""The Bots API half of the scheduler: bot sessions, lease reports, long polls, keepalive.

``BotApiMixin`` is a base class of ``Scheduler`` and works on the records and indexes that
``Scheduler.__init__`` creates: ``_jobs``, ``_sessions``, ``_leases``,
``_session_by_bot_id``, ``_queue``, ``_idle_bots``, ``_open_sessions``, ``_polls``,
``_keepalive_timers``, ``_lease_timers`` and ``_journal``, and logs through
``Scheduler.log``. It calls back into the job side through ``_set_job_stage``,
``_set_waiting_reason``, ``_refresh_waiting_reasons``, ``_handle_result``,
``_complete_job`` and ``_dispatch_job``.
"""

import uuid

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2
from twisted.internet import defer
from twisted.logger import LogLevel

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.errors import InvalidArgumentError, NotFoundError
from bgrid.scheduler import lease as lease_states
from bgrid.scheduler.bots import BotSession, new_session_name
from bgrid.scheduler.job import (
    EXECUTING,
    QUEUED,
    code_name,
    error_response,
    response_from_lease,
)
from bgrid.scheduler.lease import Lease, LeaseTransitionError, state_name
from bgrid.scheduler.platform import worker_properties
from bgrid.scheduler.store import BOT_SESSIONS, JOBS, LEASES
from bgrid.scheduler.timeouts import with_timeout

# At most this many ignored lease ids are remembered per session to log each only once.
_MAX_IGNORED_LEASES_LOGGED = 100


def _timestamp(seconds):
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(int(seconds * 1_000_000_000))
    return timestamp


class _LongPoll:
    """An UpdateBotSession call waiting for news: its Deferred and its deadline timer."""

    def __init__(self, deferred, timer):
        self.deferred = deferred
        self.timer = timer


class BotApiMixin:
    """CreateBotSession and UpdateBotSession, and the lease and session state they change."""

    def create_bot_session(self, parent, bot_session):
        """Open a session for a bot and return it as a ``BotSession`` message.

        ``parent`` is the instance name whose jobs the bot runs. The server sets the
        session's ``name`` and ``expire_time``. A session of the same ``bot_id`` is closed
        and its job requeued, because the bot restarted. When a job the bot can run is
        queued, the returned session carries it as a PENDING lease. Raises
        InvalidArgumentError when ``bot_id`` is empty, when ``name`` or ``leases`` are set,
        or for an invalid worker property.
        """
        bot_id = bot_session.bot_id
        if not bot_id:
            raise InvalidArgumentError(
                "bot_session.bot_id is missing: set it to an id that is unique among the bots"
            )
        if bot_session.name:
            raise InvalidArgumentError(
                f"bot_session.name {bot_session.name!r} must be empty in CreateBotSession: "
                "the server assigns the name"
            )
        if bot_session.leases:
            lease_ids = ", ".join(lease.id for lease in bot_session.leases)
            raise InvalidArgumentError(
                f"bot_session.leases must be empty in CreateBotSession, got leases {lease_ids}"
            )
        properties = worker_properties(bot_session.worker)

        previous = self._session_by_bot_id.get(bot_id)
        if previous is not None:
            self._close_session(previous, f"bot {bot_id} opened a new session")

        session = BotSession(
            new_session_name(parent),
            bot_id,
            parent,
            bot_session.worker,
            properties,
            bot_session.status,
            self._clock.seconds(),
        )
        self._sessions[session.name] = session
        self._journal.changed(BOT_SESSIONS, session.name)
        self._session_by_bot_id[bot_id] = session.name
        self._open_sessions.add(session.instance_name, session.property_set)
        self.log.info(
            "Opened bot session {session_name} for bot {bot_id} with properties {properties}",
            session_name=session.name,
            bot_id=bot_id,
            properties=properties,
        )
        self._refresh_waiting_reasons()
        self._fill_session(session)
        return self._respond(session)

    def update_bot_session(self, name, bot_session, deadline=None):
        """Apply the bot's report on its leases and return a Deferred firing with its session.

        ACTIVE acknowledges a PENDING lease and COMPLETED reports its result. Leases the
        session does not hold are ignored. An ACTIVE lease that the bot leaves out is lost,
        and its job is requeued. The Deferred fires at once when the bot has news (a new or
        cancelled lease). Otherwise it fires when news arrives, or at ``deadline`` (a time of
        the clock) or after ``max_long_poll``, whichever comes first. Either way it fires
        only once the session's state is durable. Cancelling it ends the wait. A session
        whose bot reports status BOT_TERMINATING is closed after its lease reports are
        applied, and the Deferred fires with its last state, without leases. It fails with
        NotFoundError for an unknown or closed session and with InvalidArgumentError when
        ``bot_session`` names another session or bot.
        """
        session = self._sessions.get(name)
        if session is None:
            return defer.fail(NotFoundError(
                f"bot session {name!r} not found, because it expired or was replaced. "
                "Create a new bot session"
            ))
        try:
            properties = self._validate_update(session, bot_session)
        except InvalidArgumentError as error:
            return defer.fail(error)

        # A previous call still waiting means the bot gave up on it: it returns now.
        self._end_poll(name)
        self._stop_keepalive(name)
        session.last_update_time = self._clock.seconds()
        session.status = bot_session.status
        if properties is not None:
            self._open_sessions.remove(session.instance_name, session.property_set)
            session.update_worker(bot_session.worker, properties)
            self._open_sessions.add(session.instance_name, session.property_set)
            self._refresh_waiting_reasons()
        self._journal.changed(BOT_SESSIONS, name)

        try:
            bot_missed_lease = self._apply_lease_reports(session, bot_session.leases)
        except LeaseTransitionError as error:
            # The lease kept its state, and the error was logged where it was raised.
            self._start_keepalive(name)
            return defer.fail(error)
        if session.status == bots_pb2.BOT_TERMINATING:
            return self._when_durable(self._end_terminating_session(session))
        self._fill_session(session)
        if session.has_news or bot_missed_lease:
            responding = defer.succeed(self._respond(session))
        else:
            responding = self._wait_for_news(session, deadline)
        return responding.addCallback(self._when_durable)

    def _when_durable(self, message):
        """Return a Deferred firing with ``message`` once the state it shows is durable."""
        return self._journal.durable().addCallback(lambda _: message)

    def _validate_update(self, session, bot_session):
        """Check an UpdateBotSession against its session and return new properties or None.

        The properties are None unless the bot sent a changed ``worker``.
        """
        if bot_session.name and bot_session.name != session.name:
            raise InvalidArgumentError(
                f"bot_session.name {bot_session.name!r} differs from the session name "
                f"{session.name!r} in the request"
            )
        if bot_session.bot_id and bot_session.bot_id != session.bot_id:
            raise InvalidArgumentError(
                f"bot_session.bot_id {bot_session.bot_id!r} differs from {session.bot_id!r}, "
                f"the bot of session {session.name}. Create a new session for another bot"
            )
        if bot_session.HasField("worker") and bot_session.worker != session.worker:
            return worker_properties(bot_session.worker)
        return None

    def _lease_proto(self, lease):
        job = self._jobs.get(lease.job_id)
        if job is None or lease.state == lease_states.CANCELLED:
            return lease.to_proto()
        action = with_timeout(job.action, self._action_timeout(job))
        payload = lease_states.action_payload(action)
        return lease.to_proto(payload, job.requirements)

    def _end_terminating_session(self, session):
        """Close the session of a bot that reported BOT_TERMINATING; return its last message.

        A PENDING lease that the bot did not report was never started, so its job is
        requeued without counting a retry.
        """
        message = session.to_proto([], _timestamp(self._clock.seconds()))
        lease = self._leases.get(session.lease_id) if session.lease_id else None
        if lease is not None and lease.state == lease_states.PENDING:
            self._requeue_lease(
                lease, f"bot {session.bot_id} is terminating and did not start the lease",
                count_retry=False,
            )
        self._close_session(
            session.name, f"bot {session.bot_id} is terminating", level=LogLevel.info
        )
        return message

    # State changes

    def _assign(self, job, session):
        lease = Lease(str(uuid.uuid4()), job.job_id, session.name)
        self._leases[lease.lease_id] = lease
        job.lease_id = lease.lease_id
        session.lease_id = lease.lease_id
        session.has_news = True
        self._journal.changed(LEASES, lease.lease_id)
        self._journal.changed(JOBS, job.job_id)
        self._journal.changed(BOT_SESSIONS, session.name)
        self._idle_bots.discard(session.name)
        self._set_waiting_reason(job, None)
        self.log.info(
            "Leased job {job_id} to bot {bot_id} as lease {lease_id} (session {session_name})",
            job_id=job.job_id,
            bot_id=session.bot_id,
            lease_id=lease.lease_id,
            session_name=session.name,
        )

    def _fill_session(self, session):
        """Give an idle session the first queued job it can run, if any."""
        if not session.accepts_work or self._stopping:
            return
        job_id = self._queue.pop_for(session.instance_name, session.property_set)
        if job_id is not None:
            self._assign(self._jobs[job_id], session)

    def _apply_lease_reports(self, session, reported_leases):
        """Apply the bot's view of its leases and return whether it missed its PENDING lease."""
        lease = self._leases.get(session.lease_id) if session.lease_id else None
        reported_current = None
        for reported in reported_leases:
            if lease is not None and reported.id == lease.lease_id:
                reported_current = reported
            else:
                self._log_ignored_lease(session, reported)

        if lease is None:
            return False
        if reported_current is None:
            if lease.state == lease_states.PENDING:
                # The response that carried the lease did not reach the bot: send it again.
                return True
            if lease.state == lease_states.ACTIVE:
                self._requeue_lease(
                    lease, f"bot {session.bot_id} left out its ACTIVE lease, so it lost the job"
                )
            else:
                self._drop_lease(session, lease)
            return False

        self._apply_lease_report(session, lease, reported_current)
        return False

    def _apply_lease_report(self, session, lease, reported):
        state = reported.state
        if lease.state == lease_states.CANCELLED:
            if state in (lease_states.COMPLETED, lease_states.CANCELLED):
                self.log.info(
                    "Bot {bot_id} released cancelled lease {lease_id} in state {state}, "
                    "and any result it sent is ignored",
                    bot_id=session.bot_id,
                    lease_id=lease.lease_id,
                    state=state_name(state),
                )
                self._drop_lease(session, lease)
            return

        if state == lease_states.ACTIVE:
            if lease.state == lease_states.PENDING:
                self._start_lease(session, lease)
        elif state == lease_states.COMPLETED:
            if lease.state == lease_states.PENDING:
                # The bot ran the lease between two calls, so it never reported it ACTIVE.
                self._start_lease(session, lease)
            self._finish_lease(session, lease, reported)
        elif state == lease_states.CANCELLED and session.status == bots_pb2.BOT_TERMINATING:
            # NOTE: an action that makes its bot stop (by signalling it, say) is requeued
            # again and again, because this does not count a retry.
            self._requeue_lease(
                lease, f"bot {session.bot_id} is terminating and returned its lease",
                count_retry=False,
            )
        elif state == lease_states.CANCELLED:
            self._requeue_lease(
                lease, f"bot {session.bot_id} reported its lease CANCELLED, giving up the job"
            )
        elif lease.state == lease_states.ACTIVE:
            self.log.warn(
                "Ignored state {state} that bot {bot_id} reported for its ACTIVE lease {lease_id}",
                state=state_name(state),
                bot_id=session.bot_id,
                lease_id=lease.lease_id,
            )

    def _send_cancellation(self, lease):
        """Send a lease that was just cancelled to its bot, ending its long poll.

        The lease stays in the session as CANCELLED until the bot reports it back, so that
        the bot learns to stop the action even if a response is lost.
        """
        self.log.info(
            "Cancelled lease {lease_id} of job {job_id} on bot session {session_name}",
            lease_id=lease.lease_id,
            job_id=lease.job_id,
            session_name=lease.session_name,
        )
        session = self._sessions.get(lease.session_name)
        if session is not None:
            session.has_news = True
            self._journal.changed(BOT_SESSIONS, session.name)
            self._end_poll(session.name)

    def _expire_lease(self, lease_id):
        """Give up on a lease that stayed ACTIVE past its action timeout and grace period.

        The job completes with DEADLINE_EXCEEDED and is not retried. The lease stays in its
        session as CANCELLED, so that the bot learns to stop the action.
        """
        lease = self._leases.get(lease_id)
        if lease is None or lease.state != lease_states.ACTIVE:
            return
        job = self._jobs[lease.job_id]
        session = self._sessions.get(lease.session_name)
        bot_id = session.bot_id if session is not None else "(closed session)"
        timeout = self._action_timeout(job)
        lease.cancel()
        self._journal.changed(LEASES, lease_id)
        job.lease_id = None
        self._journal.changed(JOBS, job.job_id)
        self.log.warn(
            "Lease {lease_id} of job {job_id} on bot {bot_id} stayed ACTIVE for {limit} s, "
            "its action timeout of {timeout} s plus {grace} s, without a result, so the "
            "job fails with DEADLINE_EXCEEDED",
            lease_id=lease_id,
            job_id=job.job_id,
            bot_id=bot_id,
            limit=timeout + self._action_timeout_grace,
            timeout=timeout,
            grace=self._action_timeout_grace,
        )
        self._complete_job(job.job_id, error_response(
            code_pb2.DEADLINE_EXCEEDED,
            f"bot {bot_id} reported no result within {timeout:g} s, the action timeout, plus "
            f"{self._action_timeout_grace:g} s after it started the action, so the server "
            f"cancelled lease {lease_id}",
        ))
        self._send_cancellation(lease)

    def _start_lease(self, session, lease):
        lease.acknowledge()
        lease.started_time = self._clock.seconds()
        self._journal.changed(LEASES, lease.lease_id)
        job = self._jobs[lease.job_id]
        self._lease_timers.start(
            lease.lease_id, self._action_timeout(job) + self._action_timeout_grace
        )
        self.log.info(
            "Bot {bot_id} started job {job_id} under lease {lease_id}",
            bot_id=session.bot_id,
            job_id=job.job_id,
            lease_id=lease.lease_id,
        )
        self._set_job_stage(job, EXECUTING)

    def _finish_lease(self, session, lease, reported):
        lease.complete()
        job = self._jobs[lease.job_id]
        job.lease_id = None
        self._journal.changed(JOBS, job.job_id)
        self._drop_lease(session, lease)
        response = response_from_lease(reported, session.bot_id, job.queued_time)
        self.log.info(
            "Bot {bot_id} completed job {job_id} under lease {lease_id} with lease status {code}",
            bot_id=session.bot_id,
            job_id=job.job_id,
            lease_id=lease.lease_id,
            code=code_name(reported.status.code),
        )
        self._handle_result(job, response)

    def _drop_lease(self, session, lease):
        del self._leases[lease.lease_id]
        self._journal.changed(LEASES, lease.lease_id)
        self._lease_timers.stop(lease.lease_id)
        if session is not None and session.lease_id == lease.lease_id:
            session.lease_id = None
            self._journal.changed(BOT_SESSIONS, session.name)

    def _requeue_lease(self, lease, reason, count_retry=True):
        """Take a lease back from its bot and requeue its job, or fail the job.

        Unless ``count_retry`` is False, the loss counts as a retry, and the job fails
        once it has more than ``max_job_retries``.
        """
        lease.cancel()
        self._drop_lease(self._sessions.get(lease.session_name), lease)
        job = self._jobs[lease.job_id]
        job.lease_id = None
        if count_retry:
            job.retries += 1
        self._journal.changed(JOBS, job.job_id)

        if not count_retry:
            self.log.info(
                "Requeued job {job_id} from lease {lease_id} without counting a retry: "
                "{reason}",
                job_id=job.job_id,
                lease_id=lease.lease_id,
                reason=reason,
            )
            if job.stage != QUEUED:
                self._set_job_stage(job, QUEUED)
            self._dispatch_job(job)
            return

        if job.retries > self._max_job_retries:
            self.log.error(
                "Failed job {job_id} after {attempts} attempts: {reason}",
                job_id=job.job_id,
                attempts=job.retries,
                reason=reason,
            )
            self._complete_job(job.job_id, error_response(
                code_pb2.UNAVAILABLE,
                f"the action was leased to a bot {job.retries} times, and each bot went away "
                f"before it reported a result. The scheduler gave up after "
                f"{self._max_job_retries} retries. Last loss: {reason}",
            ))
            return

        self.log.warn(
            "Requeued job {job_id} (retry {retry} of {max_retries}) from lease {lease_id}: "
            "{reason}",
            job_id=job.job_id,
            retry=job.retries,
            max_retries=self._max_job_retries,
            lease_id=lease.lease_id,
            reason=reason,
        )
        if job.stage != QUEUED:
            self._set_job_stage(job, QUEUED)
        self._dispatch_job(job)

    def _close_session(self, name, reason, level=LogLevel.warn):
        session = self._sessions.pop(name)
        self._journal.changed(BOT_SESSIONS, name)
        self._open_sessions.remove(session.instance_name, session.property_set)
        if self._session_by_bot_id.get(session.bot_id) == name:
            del self._session_by_bot_id[session.bot_id]
        self._stop_keepalive(name)
        self._ignored_leases_logged.pop(name, None)
        self._idle_bots.discard(name)
        poll = self._polls.pop(name, None)
        if poll is not None and poll.timer.active():
            poll.timer.cancel()
        self.log.emit(
            level,
            "Closed bot session {session_name} of bot {bot_id}: {reason}",
            session_name=name,
            bot_id=session.bot_id,
            reason=reason,
        )

        lease = self._leases.get(session.lease_id) if session.lease_id else None
        if lease is not None:
            if lease.state == lease_states.CANCELLED:
                self._drop_lease(session, lease)
            else:
                self._requeue_lease(lease, f"bot session {name} was closed: {reason}")
        self._refresh_waiting_reasons()
        if poll is not None:
            poll.deferred.errback(NotFoundError(f"bot session {name} was closed: {reason}"))

    def _log_ignored_lease(self, session, reported):
        logged = self._ignored_leases_logged.setdefault(session.name, set())
        if reported.id in logged:
            return
        if len(logged) >= _MAX_IGNORED_LEASES_LOGGED:
            logged.clear()
        logged.add(reported.id)
        self.log.warn(
            "Ignored lease {lease_id} in state {state} from bot {bot_id} (session "
            "{session_name}): the session does not hold it, because it is unknown, was "
            "cancelled or was reassigned",
            lease_id=reported.id,
            state=state_name(reported.state),
            bot_id=session.bot_id,
            session_name=session.name,
        )

    # Long polls and keepalive

    def _wait_for_news(self, session, deadline):
        now = self._clock.seconds()
        wait = self._max_long_poll
        if deadline is not None:
            wait = min(wait, deadline - now)
        if wait <= 0 or self._stopping:
            return defer.succeed(self._respond(session))

        name = session.name
        deferred = defer.Deferred(canceller=lambda d: self._abandon_poll(name, d))
        timer = self._clock.callLater(wait, self._end_poll, name)
        self._polls[name] = _LongPoll(deferred, timer)
        if session.accepts_work:
            self._idle_bots.add(session)
        return deferred

    def _end_poll(self, name):
        """Return a waiting UpdateBotSession call with the session as it is now."""
        poll = self._polls.pop(name, None)
        if poll is None:
            return
        if poll.timer.active():
            poll.timer.cancel()
        self._idle_bots.discard(name)
        poll.deferred.callback(self._respond(self._sessions[name]))

    def _abandon_poll(self, name, deferred):
        """Clean up after the caller cancelled a waiting UpdateBotSession call."""
        poll = self._polls.get(name)
        if poll is None or poll.deferred is not deferred:
            return
        del self._polls[name]
        if poll.timer.active():
            poll.timer.cancel()
        self._idle_bots.discard(name)
        self._start_keepalive(name)

    def _respond(self, session):
        """Return the session message for the end of a call, and start its keepalive timer."""
        leases = []
        if session.lease_id is not None:
            leases.append(self._lease_proto(self._leases[session.lease_id]))
        if session.has_news:
            session.has_news = False
            self._journal.changed(BOT_SESSIONS, session.name)
        self._start_keepalive(session.name)
        expire_time = _timestamp(self._clock.seconds() + self._bot_keepalive_timeout)
        return session.to_proto(leases, expire_time)

    def _start_keepalive(self, name):
        self._stop_keepalive(name)
        if self._stopping:
            return
        self._keepalive_timers[name] = self._clock.callLater(
            self._bot_keepalive_timeout, self._expire_session, name
        )

    def _stop_keepalive(self, name):
        timer = self._keepalive_timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expire_session(self, name):
        self._keepalive_timers.pop(name, None)
        self._close_session(
            name, f"no UpdateBotSession for {self._bot_keepalive_timeout} seconds"
        )
