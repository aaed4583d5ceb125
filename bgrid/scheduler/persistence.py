"""The durable half of the scheduler: encoding its records for the journal, and recovery.

``PersistenceMixin`` is a base class of ``Scheduler`` and works on the records, indexes and
timers that ``Scheduler.__init__`` creates. ``recover`` rebuilds them from the store after
a restart, including one that followed ``kill -9``. Nothing that a client or a bot was
sent is lost, provided that every message waited for ``durable()`` (see
``bgrid.scheduler.journal``).
"""

from google.rpc import code_pb2
from twisted.internet import defer

from bgrid.scheduler import lease as lease_states
from bgrid.scheduler.codec import (
    RecordFormatError,
    decode_job,
    decode_lease,
    decode_meta,
    decode_operation,
    decode_session,
    encode_job,
    encode_lease,
    encode_meta,
    encode_operation,
    encode_session,
)
from bgrid.scheduler.job import QUEUED, error_response
from bgrid.scheduler.store import BOT_SESSIONS, JOBS, LEASES, META, OPERATIONS


class PersistenceMixin:
    """``durable`` and ``recover``, and the encoding of records for the journal."""

    def durable(self):
        """Return a Deferred firing with None once every state change made so far is durable.

        Send a message built from the scheduler's state only after a Deferred requested
        after it was built has fired: then a crash cannot undo what the message shows. It
        fails with the store's error when the commit fails. Without a store it has fired.
        """
        return self._journal.durable()

    def recover(self):
        """Rebuild the scheduler from the records in its store, before any other call.

        Returns a Deferred firing with None once the state is rebuilt. Queued jobs return to
        the queue in their old order. Bot sessions are restored with their leases, and a bot
        that calls UpdateBotSession within ``bot_keepalive_timeout`` of now keeps its lease
        and may report its result. Other sessions are then closed and their jobs requeued,
        counting a retry. Results that a bot had reported but that the result handler had
        not finished with are passed to the handler again. Done operations are forgotten
        ``operation_retention`` after they completed. Records that cannot be decoded are
        logged and skipped. Fails with RecordFormatError when the records were written by a
        newer format. Without a store there is nothing to recover.
        """
        if self._jobs or self._operations or self._sessions or self._leases:
            raise RuntimeError("recover() must be called before the scheduler is used")
        if self._store is None:
            return defer.succeed(None)
        loading = defer.maybeDeferred(self._store.load)
        loading.addCallback(self._restore)
        return loading

    def _encode_record(self, kind, name):
        """Return the encoded current state of a record, or None when it does not exist."""
        if kind == JOBS:
            job = self._jobs.get(name)
            return encode_job(job) if job is not None else None
        if kind == OPERATIONS:
            operation = self._operations.get(name)
            return encode_operation(operation) if operation is not None else None
        if kind == BOT_SESSIONS:
            session = self._sessions.get(name)
            return encode_session(session) if session is not None else None
        if kind == LEASES:
            lease = self._leases.get(name)
            return encode_lease(lease) if lease is not None else None
        if kind == META:
            return encode_meta(self._next_sequence)
        raise ValueError(f"unknown scheduler record kind {kind!r}")

    # Recovery

    def _restore(self, records):
        next_sequence = decode_meta(records.meta) if records.meta is not None else 0

        for job in self._decode_all("job", records.jobs, decode_job):
            self._jobs[job.job_id] = job
        operations = self._decode_all(
            "operation", records.operations, lambda value: decode_operation(value, self._jobs)
        )
        for operation in sorted(operations, key=lambda operation: operation.sequence):
            self._operations[operation.name] = operation
            self._operation_index.add(operation.instance_name, operation.sequence, operation.name)
            job = self._jobs.get(operation.job_id)
            if job is not None:
                job.operation_names.append(operation.name)
        for session in self._decode_all("bot session", records.bot_sessions, decode_session):
            self._sessions[session.name] = session
        for lease in self._decode_all("lease", records.leases, decode_lease):
            self._leases[lease.lease_id] = lease

        sequences = [job.sequence for job in self._jobs.values()]
        sequences += [operation.sequence for operation in self._operations.values()]
        self._next_sequence = max([next_sequence] + [sequence + 1 for sequence in sequences])

        self._repair_links()
        self._restore_retention()
        self._restore_sessions()
        self._restore_jobs()
        self._restore_lease_timers()
        self.log.info(
            "Recovered {jobs} jobs ({queued} queued), {operations} operations, {sessions} bot "
            "sessions and {leases} leases. Bot sessions have {grace} seconds to call "
            "UpdateBotSession before they are closed and their jobs requeued",
            jobs=len(self._jobs),
            queued=len(self._queue),
            operations=len(self._operations),
            sessions=len(self._sessions),
            leases=len(self._leases),
            grace=self._bot_keepalive_timeout,
        )

    def _decode_all(self, kind, values, decode):
        decoded = []
        for value in values:
            try:
                decoded.append(decode(value))
            except RecordFormatError as error:
                self.log.error(
                    "Skipped a stored {kind} record that cannot be decoded: {error}",
                    kind=kind,
                    error=error,
                )
        return decoded

    def _repair_links(self):
        """Make jobs, leases and sessions that refer to each other agree.

        Records committed together always agree. This repairs what skipped records break,
        and logs each repair.
        """
        for lease in list(self._leases.values()):
            session = self._sessions.get(lease.session_name)
            job = self._jobs.get(lease.job_id)
            if session is None or session.lease_id != lease.lease_id:
                self._log_repair("lease {lease_id} has no bot session", lease_id=lease.lease_id)
                self._drop_lease(session, lease)
            elif lease.state != lease_states.CANCELLED and (
                job is None or job.done or job.lease_id != lease.lease_id
            ):
                self._log_repair("lease {lease_id} has no running job", lease_id=lease.lease_id)
                lease.cancel()
                self._journal.changed(LEASES, lease.lease_id)
                session.has_news = True
                self._journal.changed(BOT_SESSIONS, session.name)

        for session in self._sessions.values():
            if session.lease_id is not None and session.lease_id not in self._leases:
                self._log_repair(
                    "bot session {session_name} has no lease {lease_id}",
                    session_name=session.name,
                    lease_id=session.lease_id,
                )
                session.lease_id = None
                self._journal.changed(BOT_SESSIONS, session.name)

        for job in self._jobs.values():
            if job.lease_id is not None and job.lease_id not in self._leases:
                self._log_repair(
                    "job {job_id} has no lease {lease_id}", job_id=job.job_id, lease_id=job.lease_id
                )
                job.lease_id = None
                self._journal.changed(JOBS, job.job_id)

    def _log_repair(self, problem, **fields):
        self.log.warn("Repaired stored scheduler records: " + problem, **fields)

    def _restore_retention(self):
        """Schedule the expiry of done operations, and complete those whose job is lost."""
        done = [operation for operation in self._operations.values() if operation.done]
        for operation in sorted(done, key=lambda operation: operation.completed_time):
            self._retention.add(operation.name, operation.completed_time)

        for operation in list(self._operations.values()):
            if operation.done:
                continue
            job = self._jobs.get(operation.job_id)
            if job is None:
                self._log_repair(
                    "operation {operation_name} has no job {job_id}",
                    operation_name=operation.name,
                    job_id=operation.job_id,
                )
                self._complete_operation(operation, error_response(
                    code_pb2.INTERNAL,
                    f"the job of operation {operation.name} was lost in a restart of the "
                    "server. Execute the action again",
                ))
            elif job.done:
                self._complete_operation(operation, job.response)

    def _restore_sessions(self):
        """Index the sessions and give every one of them a keepalive period from now."""
        by_last_update = sorted(self._sessions.values(), key=lambda s: s.last_update_time)
        for session in by_last_update:
            self._open_sessions.add(session.instance_name, session.property_set)
            previous = self._session_by_bot_id.get(session.bot_id)
            self._session_by_bot_id[session.bot_id] = session.name
            self._start_keepalive(session.name)
            if previous is not None:
                self._close_session(previous, f"bot {session.bot_id} has a newer session")

    def _restore_lease_timers(self):
        """Start the timeout of every ACTIVE lease from the time its bot started it.

        A timeout ends no sooner than ``bot_keepalive_timeout`` from now, so that a bot
        whose timeout passed while the server was down can still report its result.
        """
        now = self._clock.seconds()
        for lease in self._leases.values():
            job = self._jobs.get(lease.job_id)
            if lease.state != lease_states.ACTIVE or job is None:
                continue
            # Leases stored before bgrid recorded start times count from now.
            started_time = lease.started_time if lease.started_time is not None else now
            due = started_time + self._action_timeout(job) + self._action_timeout_grace
            self._lease_timers.start(
                lease.lease_id, max(due - now, self._bot_keepalive_timeout)
            )

    def _restore_jobs(self):
        """Queue the jobs without a lease, and rerun the result handler for reported results."""
        for job in list(self._jobs.values()):
            if job.done:
                # Stored before done jobs were deleted at once: their operations may refer
                # to the job's response, so they are written again with it inline.
                for name in job.operation_names:
                    self._journal.changed(OPERATIONS, name)
                self._forget_done_job(job)
                continue
            if not job.do_not_cache:
                self._unfinished_jobs[job.dedup_key] = job.job_id
            if not self._waiting_operations(job):
                self._cancel_job(job)
                continue
            if job.finishing or job.lease_id is not None:
                continue
            if job.stage != QUEUED:
                self._set_job_stage(job, QUEUED)
            self._enqueue(job)

        for job in list(self._jobs.values()):
            if job.finishing:
                self.log.info(
                    "Passing the result of job {job_id} to the result handler again, because "
                    "the server stopped before it finished",
                    job_id=job.job_id,
                )
                self._handle_result(job, job.reported_response)
