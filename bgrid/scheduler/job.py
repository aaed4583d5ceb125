"""Job and operation records, and the ``Operation`` messages built from them.

A job is one action to execute. An operation is one client's request for it: identical
actions in flight share one job, so a job has one or more operations. Records contain only
strings, numbers, digests and protobuf messages, so that they can be stored as they are.
"""

import uuid

from google.longrunning import operations_pb2
from google.protobuf import message as protobuf_message
from google.rpc import code_pb2, status_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING
COMPLETED = re_pb2.ExecutionStage.COMPLETED


def code_name(code):
    """Return the ``google.rpc.Code`` name of ``code``, or the number if it has none."""
    try:
        return code_pb2.Code.Name(code)
    except ValueError:
        return str(code)


def new_operation_name(instance_name):
    """Return a fresh operation name, ``{instance_name}/operations/{uuid4}``."""
    if instance_name:
        return f"{instance_name}/operations/{uuid.uuid4()}"
    return f"operations/{uuid.uuid4()}"


def error_response(code, message):
    """Return an ``ExecuteResponse`` that carries only an error status."""
    return re_pb2.ExecuteResponse(status=status_pb2.Status(code=code, message=message))


def cancelled_response(operation_name):
    """Return the ``ExecuteResponse`` of an operation that a client cancelled."""
    return error_response(code_pb2.CANCELLED, f"operation {operation_name} was cancelled")


def response_from_lease(lease, bot_id, queued_time):
    """Return the ``ExecuteResponse`` for a ``bots_pb2.Lease`` that a bot reported COMPLETED.

    The lease status becomes the response status, and ``lease.result`` must pack an
    ``ActionResult``. A result that is not a valid ActionResult, or a missing result with an
    OK status, is an INTERNAL error. When the bot left them empty, ``bot_id`` fills
    ``execution_metadata.worker`` and ``queued_time`` (clock seconds) its
    ``queued_timestamp``.
    """
    response = re_pb2.ExecuteResponse()
    response.status.CopyFrom(lease.status)
    if lease.HasField("result"):
        try:
            unpacked = lease.result.Unpack(response.result)
        except protobuf_message.DecodeError:
            unpacked = False
        if not unpacked:
            response.ClearField("result")
            response.status.CopyFrom(status_pb2.Status(
                code=code_pb2.INTERNAL,
                message=f"bot {bot_id} reported lease {lease.id} with a result that is not a "
                f"valid ActionResult (type {lease.result.type_url!r})",
            ))
            return response
        metadata = response.result.execution_metadata
        if not metadata.worker:
            metadata.worker = bot_id
        if not metadata.HasField("queued_timestamp"):
            metadata.queued_timestamp.FromNanoseconds(int(queued_time * 1_000_000_000))
    elif lease.status.code == code_pb2.OK:
        response.status.CopyFrom(status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"bot {bot_id} reported lease {lease.id} COMPLETED without a result",
        ))
    return response


class Job:
    """One action to execute and its progress through the queue and a bot.

    ``sequence`` orders jobs of equal priority and is kept when the job is requeued, so a
    requeued job goes back to its original place. ``retries`` counts the leases lost to bots
    that went away. ``lease_id`` is the current lease or None. ``response`` is the final
    ``ExecuteResponse`` once ``stage`` is COMPLETED. ``finishing`` is True while the result
    handler processes ``reported_response``, the ``ExecuteResponse`` built from the bot's
    report. ``waiting_reason`` is a ``bgrid.scheduler.waiting.NoMatchingBot`` while the job
    is queued and no open bot session can run it, and None otherwise. It is not stored,
    because recovery computes it again.
    """

    def __init__(
        self,
        job_id,
        instance_name,
        action_digest,
        action,
        *,
        priority,
        do_not_cache,
        requirements,
        sequence,
        queued_time,
    ):
        self.job_id = job_id
        self.instance_name = instance_name
        self.action_digest = action_digest
        self.action = action
        self.priority = priority
        self.do_not_cache = do_not_cache
        self.requirements = requirements
        self.sequence = sequence
        self.queued_time = queued_time
        self.stage = QUEUED
        self.lease_id = None
        self.retries = 0
        self.finishing = False
        self.reported_response = None
        self.response = None
        self.operation_names = []
        self.waiting_reason = None

    @property
    def done(self):
        return self.stage == COMPLETED

    @property
    def dedup_key(self):
        """The key under which identical unfinished jobs are shared."""
        return (self.instance_name, self.action_digest)


# The type URL with which ``Any.Pack`` packs an ExecuteResponse.
EXECUTE_RESPONSE_TYPE_URL = (
    "type.googleapis.com/" + re_pb2.ExecuteResponse.DESCRIPTOR.full_name
)


class Operation:
    """One client's execution request, and the ``ExecuteResponse`` once it is done.

    ``job_id`` is None for an operation created done from an action cache hit. ``sequence``
    orders operations for listing. ``response_data`` is the serialized ``ExecuteResponse``
    once the operation is done, and None before. Done operations stay in memory for the
    whole retention period, and a parsed message would take about 800 bytes more than its
    serialization (measured with protobuf 7.36's upb backend). ``completed_time`` is the
    clock time at which the
    operation became done, and starts its retention period. ``waiting_reason`` is that of
    the job while the operation is not done.
    """

    __slots__ = (
        "name",
        "instance_name",
        "action_digest",
        "sequence",
        "job_id",
        "stage",
        "response_data",
        "completed_time",
        "waiting_reason",
    )

    def __init__(self, name, instance_name, action_digest, sequence, job_id=None, stage=QUEUED,
                 waiting_reason=None):
        self.name = name
        self.instance_name = instance_name
        self.action_digest = action_digest
        self.sequence = sequence
        self.job_id = job_id
        self.stage = stage
        self.response_data = None
        self.completed_time = None
        self.waiting_reason = waiting_reason

    @property
    def done(self):
        return self.response_data is not None

    def to_message(self):
        """Return the operation as a ``google.longrunning.Operation`` message.

        ``metadata`` packs an ``ExecuteOperationMetadata`` and, once the operation is done,
        ``response`` packs its ``ExecuteResponse``. Execution errors are reported in
        ``ExecuteResponse.status``, never in ``Operation.error``. A waiting reason is an
        ``ErrorInfo`` in ``partial_execution_metadata.auxiliary_metadata``.
        """
        metadata = re_pb2.ExecuteOperationMetadata(
            stage=self.stage,
            action_digest=self.action_digest.to_proto(re_pb2.Digest),
            digest_function=re_pb2.DigestFunction.SHA256,
        )
        if self.waiting_reason is not None:
            auxiliary = metadata.partial_execution_metadata.auxiliary_metadata.add()
            auxiliary.Pack(self.waiting_reason.to_error_info())
        message = operations_pb2.Operation(name=self.name, done=self.done)
        message.metadata.Pack(metadata)
        if self.response_data is not None:
            message.response.type_url = EXECUTE_RESPONSE_TYPE_URL
            message.response.value = self.response_data
        return message
