"""Tests of the ActionCache service through a real gRPC server."""

import grpc
from google.rpc import error_details_pb2, status_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.bridge import as_future
from bgrid.digest import EMPTY_DIGEST, Digest
from tests.servicers.support import (
    INSTANCE_NAMES,
    MAX_INLINE_TOTAL_BYTES,
    ServicerTestCase,
    digest_proto,
    make_blob,
)
from tests.util import async_test


def precondition_subjects(error):
    """Return the PreconditionFailure violation subjects in a gRPC error's rich status."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            subjects = []
            for detail in status.details:
                failure = error_details_pb2.PreconditionFailure()
                if detail.Unpack(failure):
                    subjects.extend(violation.subject for violation in failure.violations)
            return subjects
    return []


class ActionCacheTestCase(ServicerTestCase):
    async def store_action(self, label="action"):
        """Store an Action and its Command in the CAS and return the action digest."""
        command = re_pb2.Command(arguments=["echo", label])
        command_blob = command.SerializeToString()
        action = re_pb2.Action(
            command_digest=digest_proto(Digest.of(command_blob)),
            input_root_digest=digest_proto(EMPTY_DIGEST),
        )
        action_blob = action.SerializeToString()
        await self.put_blobs((command_blob, Digest.of(command_blob)), (action_blob, Digest.of(action_blob)))
        return Digest.of(action_blob)

    async def store_result(self, action_digest, result, instance_name="main"):
        return await self.action_cache_stub.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(
                instance_name=instance_name,
                action_digest=digest_proto(action_digest),
                action_result=result,
            )
        )

    async def get_result(self, action_digest, instance_name="main", **inline):
        return await self.action_cache_stub.GetActionResult(
            re_pb2.GetActionResultRequest(
                instance_name=instance_name, action_digest=digest_proto(action_digest), **inline
            )
        )


class UpdateActionResultTests(ActionCacheTestCase):
    @async_test
    async def test_store_and_get(self):
        action_digest = await self.store_action()
        output = make_blob(50)
        tree_file = make_blob(60)
        tree_message = re_pb2.Tree(
            root=re_pb2.Directory(
                files=[re_pb2.FileNode(name="in-tree", digest=digest_proto(tree_file[1]))]
            )
        )
        tree_blob = tree_message.SerializeToString()
        tree = (tree_blob, Digest.of(tree_blob))
        await self.put_blobs(output, tree_file, tree)
        result = re_pb2.ActionResult(exit_code=3)
        result.output_files.add(path="out/a", digest=digest_proto(output[1]), is_executable=True)
        result.output_directories.add(path="out/dir", tree_digest=digest_proto(tree[1]))

        for instance_name in INSTANCE_NAMES:
            stored = await self.store_result(action_digest, result, instance_name)
            self.assertEqual(stored, result)
            self.assertEqual(await self.get_result(action_digest, instance_name), result)

    @async_test
    async def test_results_separate_per_instance(self):
        action_digest = await self.store_action()
        await self.store_result(action_digest, re_pb2.ActionResult(exit_code=1), "main")

        await self.assert_rpc_error(
            self.get_result(action_digest, "projects/p/instances/main"),
            grpc.StatusCode.NOT_FOUND,
        )

    @async_test
    async def test_inline_data_moves_to_cas(self):
        action_digest = await self.store_action()
        stdout = b"hello from stdout"
        contents = b"file contents"
        result = re_pb2.ActionResult(stdout_raw=stdout)
        result.output_files.add(path="f", digest=digest_proto(Digest.of(contents)), contents=contents)

        stored = await self.store_result(action_digest, result)

        self.assertEqual(stored.stdout_raw, b"")
        self.assertEqual(stored.stdout_digest, digest_proto(Digest.of(stdout)))
        self.assertEqual(stored.output_files[0].contents, b"")
        self.assertTrue(await self.is_stored(Digest.of(stdout)))
        self.assertTrue(await self.is_stored(Digest.of(contents)))

    @async_test
    async def test_inline_data_mismatch(self):
        action_digest = await self.store_action()
        result = re_pb2.ActionResult(
            stderr_raw=b"actual", stderr_digest=digest_proto(Digest.of(b"other"))
        )

        await self.assert_rpc_error(
            self.store_result(action_digest, result),
            grpc.StatusCode.INVALID_ARGUMENT,
            "action_result.stderr_raw",
            Digest.of(b"other").hash,
        )
        self.assertFalse(await self.is_stored(Digest.of(b"actual")))

    @async_test
    async def test_action_not_in_cas(self):
        action_digest = make_blob(80)[1]

        error = await self.assert_rpc_error(
            self.store_result(action_digest, re_pb2.ActionResult()),
            grpc.StatusCode.FAILED_PRECONDITION,
            str(action_digest),
        )
        self.assertEqual(
            precondition_subjects(error),
            [f"blobs/{action_digest.hash}/{action_digest.size_bytes}"],
        )

    @async_test
    async def test_output_not_in_cas(self):
        action_digest = await self.store_action()
        missing = make_blob(70)[1]
        result = re_pb2.ActionResult()
        result.output_files.add(path="out", digest=digest_proto(missing))

        error = await self.assert_rpc_error(
            self.store_result(action_digest, result),
            grpc.StatusCode.FAILED_PRECONDITION,
            str(missing),
        )
        self.assertEqual(precondition_subjects(error), [f"blobs/{missing.hash}/{missing.size_bytes}"])
        await self.assert_rpc_error(self.get_result(action_digest), grpc.StatusCode.NOT_FOUND)

    @async_test
    async def test_malformed_action_digest(self):
        await self.assert_rpc_error(
            self.action_cache_stub.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    instance_name="main",
                    action_digest=re_pb2.Digest(hash="0" * 63, size_bytes=5),
                    action_result=re_pb2.ActionResult(),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "action_digest",
            "0" * 63,
        )

    @async_test
    async def test_malformed_digests_in_result(self):
        action_digest = await self.store_action()
        good = digest_proto(make_blob(10)[1])
        bad = re_pb2.Digest(hash="Z" * 64, size_bytes=1)
        cases = {
            "action_result.output_files[1].digest": re_pb2.ActionResult(
                output_files=[
                    re_pb2.OutputFile(path="a", digest=good),
                    re_pb2.OutputFile(path="b", digest=bad),
                ]
            ),
            "action_result.output_directories[0].tree_digest": re_pb2.ActionResult(
                output_directories=[re_pb2.OutputDirectory(path="d", tree_digest=bad)]
            ),
            "action_result.output_directories[0].root_directory_digest": re_pb2.ActionResult(
                output_directories=[
                    re_pb2.OutputDirectory(path="d", tree_digest=good, root_directory_digest=bad)
                ]
            ),
            "action_result.stdout_digest": re_pb2.ActionResult(stdout_digest=bad),
            "action_result.stderr_digest": re_pb2.ActionResult(
                stderr_digest=re_pb2.Digest(hash="a" * 64, size_bytes=-1)
            ),
        }

        for field, result in cases.items():
            await self.assert_rpc_error(
                self.store_result(action_digest, result), grpc.StatusCode.INVALID_ARGUMENT, field
            )

    @async_test
    async def test_output_file_without_digest(self):
        action_digest = await self.store_action()
        result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="no-digest")])

        await self.assert_rpc_error(
            self.store_result(action_digest, result),
            grpc.StatusCode.INVALID_ARGUMENT,
            "output_files[0].digest",
            "'no-digest'",
        )

    @async_test
    async def test_output_directory_without_digest(self):
        action_digest = await self.store_action()
        result = re_pb2.ActionResult(output_directories=[re_pb2.OutputDirectory(path="dir")])

        await self.assert_rpc_error(
            self.store_result(action_digest, result),
            grpc.StatusCode.INVALID_ARGUMENT,
            "output_directories[0]",
            "'dir'",
        )

    @async_test
    async def test_missing_action_result(self):
        action_digest = await self.store_action()

        await self.assert_rpc_error(
            self.action_cache_stub.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    instance_name="main", action_digest=digest_proto(action_digest)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "action_result",
        )

    @async_test
    async def test_unsupported_digest_function(self):
        action_digest = await self.store_action()

        await self.assert_rpc_error(
            self.action_cache_stub.UpdateActionResult(
                re_pb2.UpdateActionResultRequest(
                    instance_name="main",
                    action_digest=digest_proto(action_digest),
                    action_result=re_pb2.ActionResult(),
                    digest_function=re_pb2.DigestFunction.SHA1,
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SHA1",
        )

    @async_test
    async def test_unknown_instance(self):
        action_digest = await self.store_action()

        await self.assert_rpc_error(
            self.store_result(action_digest, re_pb2.ActionResult(), "projects/p/instances/other"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'projects/p/instances/other'",
        )


class GetActionResultTests(ActionCacheTestCase):
    async def store_outputs_result(self):
        """Store a result whose stdout, stderr and two output files are 300 bytes each,
        plus a third output file, and return ``(action_digest, blobs by name)``."""
        action_digest = await self.store_action()
        blobs = {name: make_blob(300) for name in ("stdout", "stderr", "a", "b", "c")}
        await self.put_blobs(*blobs.values())
        result = re_pb2.ActionResult(
            stdout_digest=digest_proto(blobs["stdout"][1]),
            stderr_digest=digest_proto(blobs["stderr"][1]),
        )
        for path in ("a", "b", "c"):
            result.output_files.add(path=path, digest=digest_proto(blobs[path][1]))
        await self.store_result(action_digest, result)
        return action_digest, blobs

    @async_test
    async def test_nothing_inlined_by_default(self):
        action_digest, _ = await self.store_outputs_result()

        result = await self.get_result(action_digest)

        self.assertEqual(result.stdout_raw, b"")
        self.assertEqual(result.stderr_raw, b"")
        self.assertEqual([file.contents for file in result.output_files], [b"", b"", b""])

    @async_test
    async def test_inlines_requested_outputs(self):
        action_digest, blobs = await self.store_outputs_result()

        result = await self.get_result(
            action_digest, inline_stdout=True, inline_output_files=["c", "not-an-output"]
        )

        self.assertEqual(result.stdout_raw, blobs["stdout"][0])
        self.assertEqual(result.stderr_raw, b"")
        contents = {file.path: file.contents for file in result.output_files}
        self.assertEqual(contents, {"a": b"", "b": b"", "c": blobs["c"][0]})

    @async_test
    async def test_inline_budget(self):
        action_digest, blobs = await self.store_outputs_result()
        self.assertEqual(MAX_INLINE_TOTAL_BYTES // 300, 3)

        result = await self.get_result(
            action_digest, inline_stdout=True, inline_stderr=True, inline_output_files=["a", "b"]
        )

        # Only three of the four requested 300-byte blobs fit the 1000-byte budget.
        self.assertEqual(result.stdout_raw, blobs["stdout"][0])
        self.assertEqual(result.stderr_raw, blobs["stderr"][0])
        contents = {file.path: file.contents for file in result.output_files}
        self.assertEqual(contents, {"a": blobs["a"][0], "b": b"", "c": b""})
        self.assertEqual(result.output_files[1].digest, digest_proto(blobs["b"][1]))

    @async_test
    async def test_stored_inline_data_without_digest_kept(self):
        # The execution service may store stdout only inline; it is then the only copy.
        action_digest = await self.store_action()
        stored = re_pb2.ActionResult(stdout_raw=b"only copy")
        await as_future(self.action_cache.put("main", action_digest, stored))

        result = await self.get_result(action_digest)

        self.assertEqual(result.stdout_raw, b"only copy")

    @async_test
    async def test_stored_inline_data_with_digest_dropped(self):
        action_digest = await self.store_action()
        stdout = make_blob(20)
        await self.put_blobs(stdout)
        stored = re_pb2.ActionResult(stdout_raw=stdout[0], stdout_digest=digest_proto(stdout[1]))
        await as_future(self.action_cache.put("main", action_digest, stored))

        result = await self.get_result(action_digest)

        self.assertEqual(result.stdout_raw, b"")
        self.assertEqual(result.stdout_digest, digest_proto(stdout[1]))

    @async_test
    async def test_not_found(self):
        await self.assert_rpc_error(
            self.get_result(make_blob(10)[1]), grpc.StatusCode.NOT_FOUND
        )

    @async_test
    async def test_malformed_action_digest(self):
        await self.assert_rpc_error(
            self.action_cache_stub.GetActionResult(
                re_pb2.GetActionResultRequest(
                    instance_name="main", action_digest=re_pb2.Digest(hash="abc", size_bytes=1)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "action_digest",
            "'abc'",
        )

    @async_test
    async def test_unsupported_digest_function(self):
        await self.assert_rpc_error(
            self.action_cache_stub.GetActionResult(
                re_pb2.GetActionResultRequest(
                    instance_name="main",
                    action_digest=digest_proto(EMPTY_DIGEST),
                    digest_function=re_pb2.DigestFunction.MD5,
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "MD5",
        )

    @async_test
    async def test_unknown_instance(self):
        await self.assert_rpc_error(
            self.get_result(EMPTY_DIGEST, instance_name="main/extra"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'main/extra'",
        )
