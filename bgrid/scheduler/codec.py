"""The stored form of the scheduler's records: one UTF-8 JSON object per record.

Scalar fields are JSON values. Protobuf messages (``Action``, ``ExecuteResponse``,
``Worker``) are their binary serialization in standard base64, so that a record stays
readable in ``mdb_dump`` and parsing never depends on the registered message types of
``Any`` fields. Digests are ``"{hash}/{size_bytes}"``. Every record kind is listed in
``bgrid.scheduler.store``, which also describes the databases and keys.

Derived state is not stored, because recovery rebuilds it. A job's operation names come
from the operation records. An operation that is not done has its job's stage. The queue
contains the unfinished jobs that have neither a lease nor a reported result.
"""

import base64
import json

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import worker_pb2
from bgrid.digest import Digest
from bgrid.scheduler.bots import BotSession
from bgrid.scheduler.job import COMPLETED, Job, Operation
from bgrid.scheduler.lease import Lease

# The version of the record format, stored in the meta record. Recovery rejects records
# written in a newer format.
FORMAT_VERSION = 1


class RecordFormatError(ValueError):
    """A stored record is not valid JSON of the expected shape."""


def _dump(fields):
    return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _load(value, kind):
    try:
        fields = json.loads(bytes(value).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise RecordFormatError(f"stored {kind} record is not UTF-8 JSON: {error}") from error
    if not isinstance(fields, dict):
        raise RecordFormatError(f"stored {kind} record is a JSON {type(fields).__name__}, "
                                "not an object")
    return fields


def _message_text(message):
    if message is None:
        return None
    return base64.b64encode(message.SerializeToString()).decode("ascii")


def _message(message_class, text):
    if text is None:
        return None
    return message_class.FromString(base64.b64decode(text, validate=True))


def _digest_text(digest):
    return f"{digest.hash}/{digest.size_bytes}"


def _digest(text):
    hash_hex, _, size = text.partition("/")
    return Digest.parse(hash_hex, size, field="stored action_digest")


def _decoding(kind, decode, value):
    """Run ``decode(fields)`` and turn any error about the record into RecordFormatError."""
    fields = _load(value, kind)
    try:
        return decode(fields)
    except RecordFormatError:
        raise
    except Exception as error:
        raise RecordFormatError(f"invalid stored {kind} record: {error!r}") from error


# Jobs


def encode_job(job):
    """Return the stored form of a ``Job``.

    ``reported_response`` is the bot's result while the result handler processes it, so
    that a restart can hand it to the handler again.
    """
    return _dump({
        "job_id": job.job_id,
        "instance_name": job.instance_name,
        "action_digest": _digest_text(job.action_digest),
        "action": _message_text(job.action),
        "priority": job.priority,
        "do_not_cache": job.do_not_cache,
        "requirements": [list(pair) for pair in job.requirements],
        "sequence": job.sequence,
        "queued_time": job.queued_time,
        "stage": job.stage,
        "lease_id": job.lease_id,
        "retries": job.retries,
        "reported_response": _message_text(job.reported_response if job.finishing else None),
        "response": _message_text(job.response),
    })


def decode_job(value):
    """Return the ``Job`` of a stored job record, without its operation names.

    Raises RecordFormatError when the record is invalid.
    """
    def decode(fields):
        job = Job(
            fields["job_id"],
            fields["instance_name"],
            _digest(fields["action_digest"]),
            _message(re_pb2.Action, fields["action"]),
            priority=int(fields["priority"]),
            do_not_cache=bool(fields["do_not_cache"]),
            requirements=tuple((name, value) for name, value in fields["requirements"]),
            sequence=int(fields["sequence"]),
            queued_time=float(fields["queued_time"]),
        )
        job.stage = int(fields["stage"])
        job.lease_id = fields["lease_id"]
        job.retries = int(fields["retries"])
        job.response = _message(re_pb2.ExecuteResponse, fields["response"])
        job.reported_response = _message(re_pb2.ExecuteResponse, fields["reported_response"])
        job.finishing = job.reported_response is not None and job.stage != COMPLETED
        return job

    return _decoding("job", decode, value)


# Operations


def encode_operation(operation):
    """Return the stored form of an ``Operation``, with its response if it is done."""
    response_text = None
    if operation.response_data is not None:
        response_text = base64.b64encode(operation.response_data).decode("ascii")
    return _dump({
        "name": operation.name,
        "instance_name": operation.instance_name,
        "action_digest": _digest_text(operation.action_digest),
        "sequence": operation.sequence,
        "job_id": operation.job_id,
        "response": response_text,
        "response_in_job": False,
        "completed_time": operation.completed_time,
    })


def decode_operation(value, jobs):
    """Return the ``Operation`` of a stored operation record.

    ``jobs`` maps job ids to the decoded jobs, which give the stage of an operation that is
    not done. Records written before done jobs were deleted at once may refer to their
    job's response (``response_in_job``), which the job's record then holds. Raises
    RecordFormatError when the record is invalid or refers to a job response that is
    missing.
    """
    def decode(fields):
        job = jobs.get(fields["job_id"]) if fields["job_id"] is not None else None
        operation = Operation(
            fields["name"],
            fields["instance_name"],
            _digest(fields["action_digest"]),
            int(fields["sequence"]),
            job_id=fields["job_id"],
        )
        if fields["response_in_job"]:
            if job is None or job.response is None:
                raise RecordFormatError(
                    f"operation {operation.name} refers to the response of job "
                    f"{fields['job_id']}, which has none or is missing"
                )
            operation.response_data = job.response.SerializeToString()
        elif fields["response"] is not None:
            response_data = base64.b64decode(fields["response"], validate=True)
            # Parsed only to reject a record that does not hold an ExecuteResponse.
            re_pb2.ExecuteResponse.FromString(response_data)
            operation.response_data = response_data
        if operation.response_data is not None:
            operation.stage = COMPLETED
            operation.completed_time = float(fields["completed_time"])
        elif job is not None:
            operation.stage = job.stage
        return operation

    return _decoding("operation", decode, value)


# Bot sessions


def encode_session(session):
    """Return the stored form of a ``BotSession``."""
    return _dump({
        "name": session.name,
        "bot_id": session.bot_id,
        "instance_name": session.instance_name,
        "worker": _message_text(session.worker),
        "properties": [list(pair) for pair in session.properties],
        "status": session.status,
        "lease_id": session.lease_id,
        "has_news": session.has_news,
        "last_update_time": session.last_update_time,
    })


def decode_session(value):
    """Return the ``BotSession`` of a stored bot session record.

    Raises RecordFormatError when the record is invalid.
    """
    def decode(fields):
        session = BotSession(
            fields["name"],
            fields["bot_id"],
            fields["instance_name"],
            _message(worker_pb2.Worker, fields["worker"]),
            tuple((name, value) for name, value in fields["properties"]),
            int(fields["status"]),
            float(fields["last_update_time"]),
        )
        session.lease_id = fields["lease_id"]
        session.has_news = bool(fields["has_news"])
        return session

    return _decoding("bot session", decode, value)


# Leases


def encode_lease(lease):
    """Return the stored form of a ``Lease``."""
    return _dump({
        "lease_id": lease.lease_id,
        "job_id": lease.job_id,
        "session_name": lease.session_name,
        "state": lease.state,
        "started_time": lease.started_time,
    })


def decode_lease(value):
    """Return the ``Lease`` of a stored lease record.

    Raises RecordFormatError when the record is invalid. A record without
    ``started_time``, written before bgrid stored it, gets None.
    """
    def decode(fields):
        started_time = fields.get("started_time")
        return Lease(
            fields["lease_id"],
            fields["job_id"],
            fields["session_name"],
            int(fields["state"]),
            started_time=float(started_time) if started_time is not None else None,
        )

    return _decoding("lease", decode, value)


# The meta record


def encode_meta(next_sequence):
    """Return the stored meta record: the format version and the next sequence number."""
    return _dump({"format": FORMAT_VERSION, "next_sequence": next_sequence})


def decode_meta(value):
    """Return the next sequence number of a stored meta record.

    Raises RecordFormatError when the record is invalid or was written in a newer format.
    """
    def decode(fields):
        version = int(fields["format"])
        if version > FORMAT_VERSION:
            raise RecordFormatError(
                f"the scheduler records are in format {version}, but this bgrid reads format "
                f"{FORMAT_VERSION} and older: run a newer bgrid on this data directory"
            )
        return int(fields["next_sequence"])

    return _decoding("meta", decode, value)
