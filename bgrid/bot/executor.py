"""Carry out one lease: fetch and stage the inputs, run the command, upload the outputs, and
return the ActionResult with the lease status."""

import asyncio
import os
import uuid
from typing import NamedTuple

import grpc
from google.protobuf import duration_pb2, message, timestamp_pb2
from google.rpc import code_pb2
from twisted.logger import Logger

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.bot.outputs import OutputSpec, collect_outputs
from bgrid.bot.retry import DEFAULT_RESULT_RETRY_SECONDS, retry_transient
from bgrid.bot.runner import run_process
from bgrid.bot.staging import fetch_input_layout, remove_tree, stage_layout
from bgrid.client.tree import hash_file
from bgrid.digest import Digest
from bgrid.errors import BgridError, InvalidArgumentError, make_status, to_status


class LeaseOutcome(NamedTuple):
    """The status and, if any, the ActionResult that the bot reports for a finished lease."""

    status: object  # google.rpc.Status
    result: object  # re_pb2.ActionResult or None


def _timestamp(seconds):
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromNanoseconds(round(seconds * 1e9))
    return timestamp


def _duration(seconds):
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _parse(message_class, data, what):
    parsed = message_class()
    try:
        parsed.ParseFromString(data)
    except message.DecodeError as error:
        raise InvalidArgumentError(f"{what} is not a valid {message_class.__name__}: {error}") from None
    return parsed


class ActionExecutor:
    """Runs the actions of leases; one executor serves every concurrency slot of a bot.

    Each lease gets a fresh build directory ``{build_root}/{random id}`` with the exec root
    and the stdout and stderr files. It is removed when the lease ends in any way.
    Timestamps, the action timeout and the retries of uploads use ``clock`` (an
    ``IReactorTime``). The process group of each running command is recorded in
    ``process_groups``, a ``bgrid.bot.processes.ProcessGroupRecords``, unless it is None.
    """

    log = Logger()

    def __init__(self, cas, cache, build_root, bot_name, clock, process_groups=None):
        self._cas = cas
        self._cache = cache
        self._build_root = build_root
        self._bot_name = bot_name
        self._clock = clock
        self._process_groups = process_groups

    async def execute(self, payload, lease_id="", bot_id="",
                      result_retry_seconds=DEFAULT_RESULT_RETRY_SECONDS):
        """Run the action of a lease payload and return its ``LeaseOutcome``.

        ``payload`` is an ``Any`` packing an Action or the Digest of one. The status is OK,
        DEADLINE_EXCEEDED (with the partial stdout and stderr in the result), INVALID_ARGUMENT
        for an invalid action or input tree, FAILED_PRECONDITION listing the blobs missing
        from the CAS, FAILED_PRECONDITION for an output that REAPI rules out, such as a
        symlink with an absolute target, or INTERNAL for a failure of the bot. Every
        Exception becomes a status. A status other than OK and DEADLINE_EXCEEDED comes
        without a result.
        Uploads of the outputs that fail transiently, as while the server restarts, are
        retried for up to ``result_retry_seconds`` after the first failure. After that, the
        status is the upload's error, such as UNAVAILABLE. Cancelling the coroutine kills
        every process of the command and raises CancelledError.
        """
        metadata = re_pb2.ExecutedActionMetadata(
            worker=self._bot_name, worker_start_timestamp=self._now()
        )
        build_directory = os.path.join(self._build_root, uuid.uuid4().hex)
        try:
            await asyncio.to_thread(os.mkdir, build_directory)
            return await self._execute(
                payload, metadata, build_directory, lease_id, bot_id, result_retry_seconds
            )
        except BgridError as error:
            self.log.info(
                "lease {lease_id} on bot {bot_id} failed: {error}",
                lease_id=lease_id, bot_id=bot_id, error=error.message,
            )
            return LeaseOutcome(to_status(error), None)
        except grpc.aio.AioRpcError as error:
            self.log.warn(
                "lease {lease_id} on bot {bot_id} failed: a call to the server failed: "
                "{code}: {details}",
                lease_id=lease_id, bot_id=bot_id, code=error.code().name, details=error.details(),
            )
            return LeaseOutcome(
                make_status(error.code().value[0], f"bot {bot_id}: {error.details()}"), None
            )
        except Exception as error:
            self.log.failure(
                "lease {lease_id} on bot {bot_id} failed with an internal error",
                lease_id=lease_id, bot_id=bot_id,
            )
            return LeaseOutcome(
                make_status(code_pb2.INTERNAL, f"bot {bot_id} failed: {error!r}"), None
            )
        finally:
            # Shielded so that a cancelled lease still cleans up; the removal runs on in
            # its thread even if this coroutine is cancelled again.
            await asyncio.shield(asyncio.to_thread(remove_tree, build_directory))

    def _now(self):
        return _timestamp(self._clock.seconds())

    async def _resolve_action(self, payload):
        if payload.Is(re_pb2.Action.DESCRIPTOR):
            action = re_pb2.Action()
            payload.Unpack(action)
            return action
        if payload.Is(re_pb2.Digest.DESCRIPTOR):
            digest_proto = re_pb2.Digest()
            payload.Unpack(digest_proto)
            digest = Digest.from_proto(digest_proto, "lease payload")
            with self._cache.pinned() as pins:
                pins.pin([digest])
                await self._cache.fetch([digest])
                return _parse(re_pb2.Action, self._cache.read(digest), f"action {digest}")
        raise InvalidArgumentError(
            f"unsupported lease payload type {payload.type_url!r}: expected an Action or the "
            f"Digest of one"
        )

    async def _execute(self, payload, metadata, build_directory, lease_id, bot_id,
                       result_retry_seconds):
        action = await self._resolve_action(payload)
        command_digest = Digest.from_proto(action.command_digest, "Action.command_digest")
        input_root_digest = Digest.from_proto(action.input_root_digest, "Action.input_root_digest")
        timeout = None
        if action.HasField("timeout"):
            timeout = action.timeout.ToNanoseconds() / 1e9
            if timeout < 0:
                raise InvalidArgumentError(f"invalid Action.timeout {timeout} s: it is negative")

        # Inputs.
        metadata.input_fetch_start_timestamp.CopyFrom(self._now())
        exec_root = os.path.join(build_directory, "root")
        with self._cache.pinned() as pins:
            pins.pin([command_digest, input_root_digest])
            await self._cache.fetch([command_digest, input_root_digest])
            command = _parse(
                re_pb2.Command, self._cache.read(command_digest), f"command {command_digest}"
            )
            spec = OutputSpec.from_command(command)
            layout = await fetch_input_layout(self._cache, pins, input_root_digest)

            def stage():
                stage_layout(exec_root, layout, self._cache)
                return spec.create_directories(exec_root)

            working_directory = await asyncio.to_thread(stage)
        metadata.input_fetch_completed_timestamp.CopyFrom(self._now())

        # Execution.
        environment = {variable.name: variable.value for variable in command.environment_variables}
        stdout_path = os.path.join(build_directory, "stdout")
        stderr_path = os.path.join(build_directory, "stderr")
        self.log.info(
            "lease {lease_id} on bot {bot_id}: running {program} with {argument_count} arguments",
            lease_id=lease_id, bot_id=bot_id, program=command.arguments[0] if command.arguments else "",
            argument_count=len(command.arguments),
        )
        metadata.execution_start_timestamp.CopyFrom(self._now())
        process = await run_process(
            list(command.arguments), environment, working_directory, stdout_path, stderr_path,
            timeout=timeout, clock=self._clock,
            process_groups=self._process_groups,
        )
        metadata.execution_completed_timestamp.CopyFrom(self._now())
        metadata.virtual_execution_duration.CopyFrom(_duration(process.duration))

        # Outputs.
        metadata.output_upload_start_timestamp.CopyFrom(self._now())
        collected = await asyncio.to_thread(collect_outputs, exec_root, spec)
        stdout_digest = await asyncio.to_thread(hash_file, stdout_path)
        stderr_digest = await asyncio.to_thread(hash_file, stderr_path)
        files = dict(collected.files)
        files.setdefault(stdout_digest, stdout_path)
        files.setdefault(stderr_digest, stderr_path)
        # Uploads that were cut off are resumed without sending blobs again, because each
        # attempt calls FindMissingBlobs first.
        await retry_transient(
            lambda: self._cas.upload_missing(blobs=collected.blobs, files=files),
            self._clock, result_retry_seconds, "uploading the outputs", lease_id, bot_id,
        )
        metadata.output_upload_completed_timestamp.CopyFrom(self._now())

        result = collected.result
        result.exit_code = process.exit_code
        result.stdout_digest.CopyFrom(stdout_digest.to_proto(re_pb2.Digest))
        result.stderr_digest.CopyFrom(stderr_digest.to_proto(re_pb2.Digest))
        metadata.worker_completed_timestamp.CopyFrom(self._now())
        result.execution_metadata.CopyFrom(metadata)

        if process.timed_out:
            self.log.info(
                "lease {lease_id} on bot {bot_id}: action timed out after {timeout} s",
                lease_id=lease_id, bot_id=bot_id, timeout=timeout,
            )
            status = make_status(
                code_pb2.DEADLINE_EXCEEDED, f"the action timed out after {timeout:g} s"
            )
        else:
            self.log.info(
                "lease {lease_id} on bot {bot_id}: command exited with code {exit_code}",
                lease_id=lease_id, bot_id=bot_id, exit_code=process.exit_code,
            )
            status = make_status(code_pb2.OK, "")
        return LeaseOutcome(status, result)
