"""Tests of ExecutionController over real LMDB storage and a real scheduler, without gRPC."""

from google.rpc import code_pb2, status_pb2
from twisted.internet import defer, task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2
from bgrid.bridge import as_deferred, as_future
from bgrid.digest import EMPTY_DIGEST, Digest
from bgrid.errors import InvalidArgumentError, MissingBlobsError, ResourceExhaustedError
from bgrid.execution import ExecutionController
from bgrid.scheduler import Scheduler, StoredResult
from bgrid.storage import cas_layout
from bgrid.storage.factory import build_storage
from tests.servicers.support import (
    digest_proto,
    make_blob,
    make_directory,
    operation_response,
)
from tests.util import async_test, make_temp_dir


class RecordingBlobStore:
    """The real blob store, with a record of the digests that reads and checks requested."""

    def __init__(self, blob_store):
        self._blob_store = blob_store
        self.read_digests = []
        self.checked_digests = []

    def get(self, digest):
        self.read_digests.append(digest)
        return self._blob_store.get(digest)

    def get_many(self, digests):
        self.read_digests.extend(digests)
        return self._blob_store.get_many(digests)

    def find_missing(self, digests):
        self.checked_digests.extend(digests)
        return self._blob_store.find_missing(digests)

    def __getattr__(self, name):
        return getattr(self._blob_store, name)

    def forget_requests(self):
        self.read_digests.clear()
        self.checked_digests.clear()


class RecordingActionCache:
    """The real action cache, with a record of the ``(instance_name, action_digest)`` keys
    that ``put`` stored."""

    def __init__(self, action_cache):
        self._action_cache = action_cache
        self.stored_keys = []

    def get(self, instance_name, action_digest):
        return self._action_cache.get(instance_name, action_digest)

    def put(self, instance_name, action_digest, action_result):
        self.stored_keys.append((instance_name, action_digest))
        return self._action_cache.put(instance_name, action_digest, action_result)


class ControllerTestCase(unittest.TestCase):
    """Starts LMDB storage in a temporary directory, a scheduler on a ``task.Clock`` and
    an ExecutionController over them."""

    def setUp(self):
        return as_deferred(self._start())

    async def _start(self):
        self.storage = build_storage(make_temp_dir(self), map_size=1 << 30)
        await as_future(self.storage.start())
        self.addCleanup(self.storage.stop)
        self.store = RecordingBlobStore(self.storage.blob_store)
        self.action_cache = RecordingActionCache(self.storage.action_cache)
        self.clock = task.Clock()
        self.scheduler = Scheduler(self.clock)
        self.addCleanup(self.scheduler.stop)
        self.controller = ExecutionController(self.store, self.action_cache, self.scheduler)

    async def put_blobs(self, *blobs):
        """Store ``(data, digest)`` pairs in the CAS."""
        outcomes = await as_future(self.store.put_many([(digest, data) for data, digest in blobs]))
        for outcome in outcomes:
            if outcome is not None:
                raise outcome

    async def execute_with_input_root(self, root_digest):
        """Store an action whose input root is ``root_digest``, execute it and return the
        operation name."""
        command_blob = re_pb2.Command(arguments=["true"]).SerializeToString()
        action_blob = re_pb2.Action(
            command_digest=digest_proto(Digest.of(command_blob)),
            input_root_digest=digest_proto(root_digest),
        ).SerializeToString()
        await self.put_blobs(
            (command_blob, Digest.of(command_blob)), (action_blob, Digest.of(action_blob))
        )
        return await as_future(self.controller.execute("main", Digest.of(action_blob)))

    async def assert_missing(self, root_digest, *digests):
        with self.assertRaises(MissingBlobsError) as caught:
            await self.execute_with_input_root(root_digest)
        self.assertCountEqual(caught.exception.digests, digests)


class InputTreeTests(ControllerTestCase):
    @async_test
    async def test_complete_tree(self):
        file_a, file_b = make_blob(10), make_blob(20)
        sub = make_directory(files=[("b", file_b[1])])
        root = make_directory(files=[("a", file_a[1])], directories=[("sub", sub[1])])
        await self.put_blobs(file_a, file_b, sub, root)

        name = await self.execute_with_input_root(root[1])
        self.assertFalse(self.scheduler.get_operation(name).done)

    @async_test
    async def test_empty_input_root(self):
        name = await self.execute_with_input_root(EMPTY_DIGEST)
        self.assertFalse(self.scheduler.get_operation(name).done)

    @async_test
    async def test_lists_every_missing_blob(self):
        present_file = make_blob(10)
        missing_files = [make_blob(11), make_blob(12), make_blob(13)]
        missing_directory = make_directory(files=[("x", make_blob(14)[1])])
        deep_missing_directory = make_directory(files=[("y", make_blob(15)[1])])
        present_sub = make_directory(
            files=[("c", missing_files[2][1])],
            directories=[("deeper", deep_missing_directory[1])],
        )
        root = make_directory(
            files=[("a", missing_files[0][1]), ("b", missing_files[1][1]), ("p", present_file[1])],
            directories=[("gone", missing_directory[1]), ("sub", present_sub[1])],
        )
        await self.put_blobs(present_file, present_sub, root)

        await self.assert_missing(
            root[1],
            missing_files[0][1],
            missing_files[1][1],
            missing_files[2][1],
            missing_directory[1],
            deep_missing_directory[1],
        )

    @async_test
    async def test_missing_root(self):
        root = make_directory(files=[("a", make_blob(10)[1])])
        await self.assert_missing(root[1], root[1])

    @async_test
    async def test_shared_file_reported_once(self):
        shared = make_blob(10)
        sub_one = make_directory(files=[("f", shared[1])])
        sub_two = make_directory(files=[("g", shared[1])])
        root = make_directory(directories=[("one", sub_one[1]), ("two", sub_two[1])])
        await self.put_blobs(sub_one, sub_two, root)
        await self.assert_missing(root[1], shared[1])

    @async_test
    async def test_unparsable_directory(self):
        data = b"\x0a\x05ab"
        await self.put_blobs((data, Digest.of(data)))
        with self.assertRaises(InvalidArgumentError) as caught:
            await self.execute_with_input_root(Digest.of(data))
        self.assertIn(str(Digest.of(data)), caught.exception.message)

    @async_test
    async def test_upload_after_missing_succeeds(self):
        missing_file = make_blob(10)
        sub = make_directory(files=[("f", missing_file[1])])
        root = make_directory(directories=[("sub", sub[1])])
        await self.put_blobs(sub, root)
        await self.assert_missing(root[1], missing_file[1])

        await self.put_blobs(missing_file)
        name = await self.execute_with_input_root(root[1])
        self.assertFalse(self.scheduler.get_operation(name).done)


class HandleResultTests(ControllerTestCase):
    async def store_action(self, do_not_cache=False):
        command = re_pb2.Command(arguments=["true"])
        command_blob = command.SerializeToString()
        action = re_pb2.Action(
            command_digest=digest_proto(Digest.of(command_blob)),
            input_root_digest=digest_proto(EMPTY_DIGEST),
            do_not_cache=do_not_cache,
        )
        action_blob = action.SerializeToString()
        await self.put_blobs((command_blob, Digest.of(command_blob)), (action_blob, Digest.of(action_blob)))
        return Digest.of(action_blob), action

    async def handle(
        self, result, status_code=code_pb2.OK, do_not_cache=False, action_do_not_cache=False
    ):
        """Pass ``result`` through handle_result; return whether it was stored in the cache."""
        action_digest, action = await self.store_action(action_do_not_cache)
        response = re_pb2.ExecuteResponse(result=result, status=status_pb2.Status(code=status_code))
        outcome = await as_future(
            self.controller.handle_result("main", action_digest, action, do_not_cache, response)
        )
        if ("main", action_digest) not in self.action_cache.stored_keys:
            self.assertIsNone(outcome)
            return False
        self.assertIsInstance(outcome, StoredResult)
        self.assertIsNone(outcome.response)
        await as_future(outcome.written)
        cached = await as_future(self.action_cache.get("main", action_digest))
        self.assertEqual(cached, result)
        return True

    async def tree_result(self, store_tree=True, store_tree_file=True):
        """Return an ActionResult with one output directory whose Tree contains one file."""
        tree_file = make_blob(30)
        tree = re_pb2.Tree(
            root=re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=digest_proto(tree_file[1]))]),
        )
        tree_blob = tree.SerializeToString()
        blobs = []
        if store_tree_file:
            blobs.append(tree_file)
        if store_tree:
            blobs.append((tree_blob, Digest.of(tree_blob)))
        await self.put_blobs(*blobs)
        result = re_pb2.ActionResult(exit_code=0)
        result.output_directories.add(path="out", tree_digest=digest_proto(Digest.of(tree_blob)))
        return result

    @async_test
    async def test_caches_complete_result(self):
        stdout = make_blob(5)
        await self.put_blobs(stdout)
        result = await self.tree_result()
        result.stdout_digest.CopyFrom(digest_proto(stdout[1]))
        self.assertTrue(await self.handle(result))

    @async_test
    async def test_tree_file_missing(self):
        result = await self.tree_result(store_tree_file=False)
        self.assertFalse(await self.handle(result))

    @async_test
    async def test_tree_missing(self):
        result = await self.tree_result(store_tree=False)
        self.assertFalse(await self.handle(result))

    @async_test
    async def test_output_file_missing(self):
        result = re_pb2.ActionResult(exit_code=0)
        result.output_files.add(path="out", digest=digest_proto(make_blob(10)[1]))
        self.assertFalse(await self.handle(result))

    @async_test
    async def test_nonzero_exit_code(self):
        self.assertFalse(await self.handle(re_pb2.ActionResult(exit_code=2)))

    @async_test
    async def test_error_status(self):
        self.assertFalse(
            await self.handle(re_pb2.ActionResult(exit_code=0), status_code=code_pb2.DEADLINE_EXCEEDED)
        )

    @async_test
    async def test_do_not_cache(self):
        self.assertFalse(await self.handle(re_pb2.ActionResult(exit_code=0), do_not_cache=True))
        self.assertFalse(
            await self.handle(re_pb2.ActionResult(exit_code=0), action_do_not_cache=True)
        )


    @async_test
    async def test_failed_cache_write_logged(self):
        action_digest, action = await self.store_action()
        self.controller.action_cache = FailingActionCache()
        response = re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=0))

        outcome = await as_future(
            self.controller.handle_result("main", action_digest, action, False, response)
        )

        self.assertIsNone(await as_future(outcome.written))
        self.assertEqual(len(self.flushLoggedErrors(ResourceExhaustedError)), 1)


class FailingActionCache:
    """An action cache whose writes fail as on a full disk."""

    def put(self, instance_name, action_digest, action_result):
        return defer.fail(ResourceExhaustedError("storage is full (test)"))


class ExecuteTests(ControllerTestCase):
    async def store_action(self, action_platform=(), command_platform=()):
        command = re_pb2.Command(arguments=["true"])
        for name, value in command_platform:
            command.platform.properties.add(name=name, value=value)
        command_blob = command.SerializeToString()
        action = re_pb2.Action(
            command_digest=digest_proto(Digest.of(command_blob)),
            input_root_digest=digest_proto(EMPTY_DIGEST),
        )
        for name, value in action_platform:
            action.platform.properties.add(name=name, value=value)
        action_blob = action.SerializeToString()
        await self.put_blobs((command_blob, Digest.of(command_blob)), (action_blob, Digest.of(action_blob)))
        return Digest.of(action_blob)

    def create_bot_session(self, bot_id, properties=()):
        worker = worker_pb2.Worker(
            properties=[worker_pb2.Worker.Property(key=k, value=v) for k, v in properties]
        )
        return self.scheduler.create_bot_session(
            "main", bots_pb2.BotSession(bot_id=bot_id, status=bots_pb2.OK, worker=worker)
        )

    @async_test
    async def test_inputs_pinned_until_done(self):
        action_digest = await self.store_action()
        name = await as_future(self.controller.execute("main", action_digest))
        # The Action and the Command; the empty input root is never pinned.
        self.assertEqual(self.store.pinned_blobs, 2)

        self.scheduler.cancel_operation(name)

        self.assertEqual(self.store.pinned_blobs, 0)

    @async_test
    async def test_command_platform_used_without_action_platform(self):
        action_digest = await self.store_action(command_platform=[("OSFamily", "linux")])
        await as_future(self.controller.execute("main", action_digest))

        self.assertEqual(list(self.create_bot_session("plain").leases), [])
        session = self.create_bot_session("linux", [("OSFamily", "linux")])
        self.assertEqual(len(session.leases), 1)

    @async_test
    async def test_action_platform_wins_over_command_platform(self):
        action_digest = await self.store_action(
            action_platform=[("OSFamily", "linux")], command_platform=[("OSFamily", "macos")]
        )
        await as_future(self.controller.execute("main", action_digest))

        self.assertEqual(list(self.create_bot_session("mac", [("OSFamily", "macos")]).leases), [])
        session = self.create_bot_session("linux", [("OSFamily", "linux")])
        self.assertEqual(len(session.leases), 1)

    async def corrupt_blob(self, digest):
        """Overwrite the stored bytes of a small blob in LMDB, as a disk error would."""
        environment = self.storage.environment
        dbs = cas_layout.CasDatabases.of(environment)
        record = await as_future(environment.read(cas_layout.read_record, dbs, digest.key))

        def damage(txn):
            key = cas_layout.chunk_key(record.blob_id, 0)
            txn.put(key, b"\x00" * digest.size_bytes, db=dbs.chunks)

        await as_future(environment.write(damage))

    @async_test
    async def test_corrupt_action_is_missing(self):
        action_digest = await self.store_action()
        await self.corrupt_blob(action_digest)
        with self.assertRaises(MissingBlobsError) as caught:
            await as_future(self.controller.execute("main", action_digest))
        self.assertEqual(caught.exception.digests, [action_digest])

    @async_test
    async def test_corrupt_command_is_missing(self):
        action_digest = await self.store_action()
        action = re_pb2.Action.FromString(await as_future(self.store.get(action_digest)))
        command_digest = Digest.from_proto(action.command_digest)
        await self.corrupt_blob(command_digest)
        with self.assertRaises(MissingBlobsError) as caught:
            await as_future(self.controller.execute("main", action_digest))
        self.assertEqual(caught.exception.digests, [command_digest])

    @async_test
    async def test_missing_command_and_inputs_reported_together(self):
        command_digest = Digest.of(re_pb2.Command(arguments=["true"]).SerializeToString())
        input_root_digest = Digest.of(b"an input root that was never uploaded")
        action_blob = re_pb2.Action(
            command_digest=digest_proto(command_digest),
            input_root_digest=digest_proto(input_root_digest),
        ).SerializeToString()
        action_digest = Digest.of(action_blob)
        await self.put_blobs((action_blob, action_digest))

        with self.assertRaises(MissingBlobsError) as caught:
            await as_future(self.controller.execute("main", action_digest))

        self.assertEqual(caught.exception.digests, [command_digest, input_root_digest])

    @async_test
    async def test_cache_hit_creates_done_operation(self):
        action_digest = await self.store_action()
        result = re_pb2.ActionResult(exit_code=0)
        result.execution_metadata.worker = "earlier-bot"
        await as_future(self.action_cache.put("main", action_digest, result))

        name = await as_future(self.controller.execute("main", action_digest))
        operation = self.scheduler.get_operation(name)
        self.assertTrue(operation.done)
        response = operation_response(operation)
        self.assertTrue(response.cached_result)
        self.assertEqual(response.result, result)
        self.assertEqual(self.scheduler.stats()["queued_jobs"], 0)
