"""Tests of the ContentAddressableStorage service through a real gRPC server."""

import base64

import grpc
from google.rpc import code_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.bridge import as_future
from bgrid.digest import EMPTY_DIGEST, Digest
from bgrid.servicers.cas import encode_page_token
from tests.servicers.support import (
    INSTANCE_NAMES,
    MAX_BATCH_TOTAL_SIZE_BYTES,
    MAX_TREE_PAGE_SIZE,
    ServicerTestCase,
    digest_proto,
    make_blob,
)
from tests.util import async_test

MALFORMED_DIGESTS = [
    ("uppercase hash", re_pb2.Digest(hash="A" * 64, size_bytes=1), "'" + "A" * 64 + "'"),
    ("short hash", re_pb2.Digest(hash="ab" * 10, size_bytes=1), "'" + "ab" * 10 + "'"),
    ("non-hex hash", re_pb2.Digest(hash="g" * 64, size_bytes=1), "'" + "g" * 64 + "'"),
    ("negative size", re_pb2.Digest(hash="a" * 64, size_bytes=-5), "-5"),
]


class FindMissingBlobsTests(ServicerTestCase):
    @async_test
    async def test_reports_missing_only(self):
        stored = make_blob(100)
        missing = make_blob(200)
        await self.put_blobs(stored)

        for instance_name in INSTANCE_NAMES:
            response = await self.cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(
                    instance_name=instance_name,
                    blob_digests=[
                        digest_proto(stored[1]),
                        digest_proto(missing[1]),
                        digest_proto(EMPTY_DIGEST),
                        digest_proto(missing[1]),
                    ],
                )
            )
            self.assertEqual(list(response.missing_blob_digests), [digest_proto(missing[1])])

    @async_test
    async def test_empty_digest_never_missing(self):
        response = await self.cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(blob_digests=[digest_proto(EMPTY_DIGEST)])
        )
        self.assertEqual(list(response.missing_blob_digests), [])

    @async_test
    async def test_malformed_digest(self):
        valid = digest_proto(make_blob(10)[1])
        for case, bad_digest, shown in MALFORMED_DIGESTS:
            error = await self.assert_rpc_error(
                self.cas.FindMissingBlobs(
                    re_pb2.FindMissingBlobsRequest(instance_name="main", blob_digests=[valid, bad_digest])
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "blob_digests[1]",
                shown,
            )
            self.assertTrue(error.details(), case)

    @async_test
    async def test_unknown_instance(self):
        await self.assert_rpc_error(
            self.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="projects/p")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'projects/p'",
        )

    @async_test
    async def test_unsupported_digest_function(self):
        await self.assert_rpc_error(
            self.cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(digest_function=re_pb2.DigestFunction.BLAKE3)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BLAKE3",
        )

    @async_test
    async def test_sha256_digest_function_accepted(self):
        response = await self.cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(
                digest_function=re_pb2.DigestFunction.SHA256,
                blob_digests=[digest_proto(EMPTY_DIGEST)],
            )
        )
        self.assertEqual(list(response.missing_blob_digests), [])


class BatchUpdateBlobsTests(ServicerTestCase):
    @async_test
    async def test_stores_every_blob(self):
        first = make_blob(1000)
        second = make_blob(5000)

        response = await self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                instance_name="projects/p/instances/main",
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_proto(digest), data=data)
                    for data, digest in (first, second)
                ],
            )
        )

        self.assertEqual(
            [entry.digest for entry in response.responses],
            [digest_proto(first[1]), digest_proto(second[1])],
        )
        self.assertEqual([entry.status.code for entry in response.responses], [code_pb2.OK] * 2)
        self.assertTrue(await self.is_stored(first[1]))
        self.assertTrue(await self.is_stored(second[1]))

    @async_test
    async def test_same_blob_twice(self):
        data, digest = make_blob(1000)
        entry = re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_proto(digest), data=data)

        response = await self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(requests=[entry, entry])
        )

        self.assertEqual([entry.status.code for entry in response.responses], [code_pb2.OK] * 2)
        self.assertEqual(await as_future(self.store.get(digest)), data)
        self.assertEqual(self.store.stored_bytes, len(data))

    @async_test
    async def test_hash_mismatch_fails_that_blob_only(self):
        good = make_blob(100)
        data, _ = make_blob(100)
        wrong_digest = make_blob(100)[1]

        response = await self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_proto(wrong_digest), data=data),
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_proto(good[1]), data=good[0]),
                ],
            )
        )

        mismatch, stored = response.responses
        self.assertEqual(mismatch.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertIn(wrong_digest.hash, mismatch.status.message)
        self.assertEqual(stored.status.code, code_pb2.OK)
        self.assertFalse(await self.is_stored(wrong_digest))
        self.assertTrue(await self.is_stored(good[1]))

    @async_test
    async def test_wrong_size_fails_that_blob(self):
        data, digest = make_blob(100)
        wrong_size = Digest(digest.hash, 99)

        response = await self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_proto(wrong_size), data=data)]
            )
        )

        (entry,) = response.responses
        self.assertEqual(entry.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertIn("100 bytes", entry.status.message)
        self.assertIn("99", entry.status.message)
        self.assertFalse(await self.is_stored(digest))

    @async_test
    async def test_malformed_digest_fails_that_blob(self):
        good = make_blob(10)
        requests = [re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_proto(good[1]), data=good[0])]
        for _, bad_digest, _ in MALFORMED_DIGESTS:
            requests.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=bad_digest, data=b"x"))

        response = await self.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=requests))

        self.assertEqual(response.responses[0].status.code, code_pb2.OK)
        for index, (case, bad_digest, shown) in enumerate(MALFORMED_DIGESTS, start=1):
            entry = response.responses[index]
            self.assertEqual(entry.digest, bad_digest, case)
            self.assertEqual(entry.status.code, code_pb2.INVALID_ARGUMENT, case)
            self.assertIn(f"requests[{index}].digest", entry.status.message, case)
            self.assertIn(shown, entry.status.message, case)

    @async_test
    async def test_compressor_rejected_for_that_blob(self):
        data, digest = make_blob(100)

        response = await self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(
                        digest=digest_proto(digest), data=data, compressor=re_pb2.Compressor.ZSTD
                    )
                ]
            )
        )

        (entry,) = response.responses
        self.assertEqual(entry.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertIn("ZSTD", entry.status.message)
        self.assertFalse(await self.is_stored(digest))

    @async_test
    async def test_oversized_batch(self):
        blobs = [make_blob(MAX_BATCH_TOTAL_SIZE_BYTES // 2 + 1) for _ in range(2)]
        total = sum(len(data) for data, _ in blobs)

        await self.assert_rpc_error(
            self.cas.BatchUpdateBlobs(
                re_pb2.BatchUpdateBlobsRequest(
                    requests=[
                        re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_proto(digest), data=data)
                        for data, digest in blobs
                    ]
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            str(total),
            str(MAX_BATCH_TOTAL_SIZE_BYTES),
        )
        self.assertFalse(await self.is_stored(blobs[0][1]))

    @async_test
    async def test_batch_at_limit_accepted(self):
        data, digest = make_blob(MAX_BATCH_TOTAL_SIZE_BYTES)

        response = await self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_proto(digest), data=data)]
            )
        )

        self.assertEqual(response.responses[0].status.code, code_pb2.OK)

    @async_test
    async def test_unknown_instance(self):
        await self.assert_rpc_error(
            self.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(instance_name="main/")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'main/'",
        )


class BatchReadBlobsTests(ServicerTestCase):
    @async_test
    async def test_reads_blobs_and_reports_missing(self):
        stored = make_blob(3000)
        missing = make_blob(10)
        await self.put_blobs(stored)

        response = await self.cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(
                instance_name="projects/p/instances/main",
                digests=[digest_proto(stored[1]), digest_proto(missing[1]), digest_proto(EMPTY_DIGEST)],
            )
        )

        found, not_found, empty = response.responses
        self.assertEqual(found.digest, digest_proto(stored[1]))
        self.assertEqual(found.status.code, code_pb2.OK)
        self.assertEqual(found.data, stored[0])
        self.assertEqual(found.compressor, re_pb2.Compressor.IDENTITY)
        self.assertEqual(not_found.status.code, code_pb2.NOT_FOUND)
        self.assertIn(missing[1].hash, not_found.status.message)
        self.assertEqual(empty.status.code, code_pb2.OK)
        self.assertEqual(empty.data, b"")

    @async_test
    async def test_malformed_digest_fails_that_blob(self):
        stored = make_blob(30)
        await self.put_blobs(stored)
        _, bad_digest, shown = MALFORMED_DIGESTS[0]

        response = await self.cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(digests=[bad_digest, digest_proto(stored[1])])
        )

        bad, good = response.responses
        self.assertEqual(bad.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertIn("digests[0]", bad.status.message)
        self.assertIn(shown, bad.status.message)
        self.assertEqual(good.data, stored[0])

    @async_test
    async def test_oversized_batch(self):
        # The limit applies to the requested sizes, whether or not the blobs exist.
        digests = [make_blob(10)[1]._replace(size_bytes=MAX_BATCH_TOTAL_SIZE_BYTES // 3) for _ in range(4)]
        total = sum(digest.size_bytes for digest in digests)

        await self.assert_rpc_error(
            self.cas.BatchReadBlobs(
                re_pb2.BatchReadBlobsRequest(digests=[digest_proto(digest) for digest in digests])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            str(total),
            str(MAX_BATCH_TOTAL_SIZE_BYTES),
        )

    @async_test
    async def test_unknown_instance(self):
        await self.assert_rpc_error(
            self.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(instance_name="projects/p/instances")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'projects/p/instances'",
        )


def directory_with(label, children=(), file_count=1, name_size=8):
    """Return a Directory with ``file_count`` files unique to ``label`` and the children,
    given as ``(name, digest)``."""
    directory = re_pb2.Directory()
    for index in range(file_count):
        name = f"{label}-{index}".ljust(name_size, "x")
        directory.files.add(name=name, digest=digest_proto(Digest.of(name.encode())))
    for name, digest in sorted(children):
        directory.directories.add(name=name, digest=digest_proto(digest))
    return directory


class TreeBuilder:
    """Collects Directory blobs and their digests for GetTree tests."""

    def __init__(self):
        self.blobs = {}

    def add(self, directory):
        data = directory.SerializeToString()
        digest = Digest.of(data)
        self.blobs[digest] = data
        return digest

    def unique_directories(self, root):
        """Return the digests of the root and every directory below it, each once."""
        found = set()
        stack = [root]
        while stack:
            digest = stack.pop()
            if digest in found:
                continue
            found.add(digest)
            directory = re_pb2.Directory.FromString(self.blobs[digest])
            stack.extend(Digest.from_proto(node.digest) for node in directory.directories)
        return found


def build_deep_wide_tree(builder):
    """Return the root digest of a tree that is 4 levels wide and a 12-level chain deep,
    with one subdirectory and the empty directory occurring in several places."""
    empty = builder.add(re_pb2.Directory())
    shared = builder.add(directory_with("shared", [("empty", empty)]))

    chain = builder.add(directory_with("chain-bottom", [("empty", empty)]))
    for depth in range(12):
        chain = builder.add(directory_with(f"chain-{depth}", [("next", chain), ("shared", shared)]))

    top_children = []
    for top in range(6):
        middle_children = []
        for middle in range(5):
            leaves = [
                (f"leaf-{leaf}", builder.add(directory_with(f"leaf-{top}-{middle}-{leaf}")))
                for leaf in range(3)
            ]
            leaves.append(("shared", shared))
            middle_children.append(
                (f"middle-{middle}", builder.add(directory_with(f"middle-{top}-{middle}", leaves)))
            )
        if top == 0:
            middle_children.append(("chain", chain))
        middle_children.append(("empty", empty))
        top_children.append((f"top-{top}", builder.add(directory_with(f"top-{top}", middle_children))))
    return builder.add(directory_with("root", top_children + [("shared", shared)]))


class GetTreeTests(ServicerTestCase):
    async def store_tree(self, builder):
        await self.put_blobs(*[(data, digest) for digest, data in builder.blobs.items()])

    async def get_tree(self, root, page_size=0, page_token="", instance_name="main"):
        return await self.read_stream(
            self.cas.GetTree(
                re_pb2.GetTreeRequest(
                    instance_name=instance_name,
                    root_digest=digest_proto(root),
                    page_size=page_size,
                    page_token=page_token,
                )
            )
        )

    def listed_digests(self, pages):
        return [
            Digest.of(directory.SerializeToString())
            for page in pages
            for directory in page.directories
        ]

    @async_test
    async def test_small_tree_in_one_page(self):
        builder = TreeBuilder()
        leaf = builder.add(directory_with("leaf"))
        root = builder.add(directory_with("root", [("a", leaf), ("b", leaf)]))
        await self.store_tree(builder)

        for instance_name in INSTANCE_NAMES:
            pages = await self.get_tree(root, instance_name=instance_name)

            self.assertEqual(len(pages), 1)
            self.assertEqual(self.listed_digests(pages), [root, leaf])
            self.assertEqual(pages[0].next_page_token, "")

    @async_test
    async def test_pages_cover_tree_once(self):
        builder = TreeBuilder()
        root = build_deep_wide_tree(builder)
        await self.store_tree(builder)
        expected = builder.unique_directories(root)

        pages = await self.get_tree(root, page_size=7)
        listed = self.listed_digests(pages)

        self.assertEqual(listed[0], root)
        self.assertEqual(len(listed), len(set(listed)))
        self.assertEqual(set(listed), expected)
        self.assertEqual(len(pages), -(-len(expected) // 7))
        for page in pages[:-1]:
            self.assertEqual(len(page.directories), 7)
            self.assertNotEqual(page.next_page_token, "")
        self.assertEqual(pages[-1].next_page_token, "")

    @async_test
    async def test_breadth_first_order(self):
        builder = TreeBuilder()
        root = build_deep_wide_tree(builder)
        await self.store_tree(builder)

        listed = self.listed_digests(await self.get_tree(root, page_size=7))

        # Every directory after the root follows a directory that lists it as a child,
        # and the 12-level chain comes last because it is the deepest part of the tree.
        positions = {digest: index for index, digest in enumerate(listed)}
        for digest in listed[1:]:
            parents = [
                positions[parent]
                for parent in listed
                if any(
                    Digest.from_proto(node.digest) == digest
                    for node in re_pb2.Directory.FromString(builder.blobs[parent]).directories
                )
            ]
            self.assertLess(min(parents), positions[digest])
        last = re_pb2.Directory.FromString(builder.blobs[listed[-1]])
        self.assertTrue(last.files[0].name.startswith("chain-bottom"))

    @async_test
    async def test_resume_from_page_token(self):
        builder = TreeBuilder()
        root = build_deep_wide_tree(builder)
        await self.store_tree(builder)
        pages = await self.get_tree(root, page_size=7)
        listed = self.listed_digests(pages)

        resumed = await self.get_tree(root, page_size=7, page_token=pages[3].next_page_token)

        self.assertEqual(self.listed_digests(resumed), listed[4 * 7 :])
        self.assertEqual(resumed[-1].next_page_token, "")

    @async_test
    async def test_resume_with_other_page_size(self):
        builder = TreeBuilder()
        root = build_deep_wide_tree(builder)
        await self.store_tree(builder)
        listed = self.listed_digests(await self.get_tree(root, page_size=7))
        first_page = (await self.get_tree(root, page_size=10))[0]

        resumed = await self.get_tree(root, page_size=3, page_token=first_page.next_page_token)

        self.assertEqual(self.listed_digests(resumed), listed[10:])

    @async_test
    async def test_default_and_capped_page_size(self):
        builder = TreeBuilder()
        root = build_deep_wide_tree(builder)
        await self.store_tree(builder)
        self.assertGreater(len(builder.unique_directories(root)), MAX_TREE_PAGE_SIZE)

        for page_size in (0, MAX_TREE_PAGE_SIZE + 1, 2**31 - 1):
            pages = await self.get_tree(root, page_size=page_size)
            self.assertEqual(len(pages[0].directories), MAX_TREE_PAGE_SIZE, page_size)

    @async_test
    async def test_page_ends_at_byte_limit(self):
        builder = TreeBuilder()
        # Each directory is about 100 KiB, so only two fit the 256 KiB batch limit.
        children = [
            (f"big-{index}", builder.add(directory_with(f"big-{index}", file_count=100, name_size=1000)))
            for index in range(5)
        ]
        root = builder.add(directory_with("root", children))
        await self.store_tree(builder)

        pages = await self.get_tree(root, page_size=10)

        self.assertEqual([len(page.directories) for page in pages], [3, 2, 1])
        for page in pages:
            size = sum(directory.ByteSize() for directory in page.directories)
            self.assertLessEqual(size, MAX_BATCH_TOTAL_SIZE_BYTES)
        self.assertEqual(set(self.listed_digests(pages)), builder.unique_directories(root))

    @async_test
    async def test_invalid_page_tokens(self):
        builder = TreeBuilder()
        root = build_deep_wide_tree(builder)
        other_root = builder.add(directory_with("other"))
        await self.store_tree(builder)
        total = len(builder.unique_directories(root))

        tokens = {
            "not base64": "!!not-a-token!!",
            "wrong length": base64.urlsafe_b64encode(b"short").decode(),
            "other root": encode_page_token(other_root, 3),
            "past the end": encode_page_token(root, total),
            "non-ASCII": "t\u00f6ken",
        }
        for case, token in tokens.items():
            error = await self.assert_rpc_error(
                self.get_tree(root, page_token=token),
                grpc.StatusCode.INVALID_ARGUMENT,
                "page_token",
                repr(token),
            )
            self.assertTrue(error.details(), case)

    @async_test
    async def test_negative_page_size(self):
        await self.assert_rpc_error(
            self.get_tree(EMPTY_DIGEST, page_size=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_size",
            "-1",
        )

    @async_test
    async def test_missing_root(self):
        missing = make_blob(40)[1]

        await self.assert_rpc_error(
            self.get_tree(missing), grpc.StatusCode.NOT_FOUND, str(missing)
        )

    @async_test
    async def test_missing_child_directory(self):
        builder = TreeBuilder()
        present = builder.add(directory_with("present"))
        absent = Digest.of(directory_with("absent").SerializeToString())
        root = builder.add(directory_with("root", [("absent", absent), ("present", present)]))
        await self.store_tree(builder)

        await self.assert_rpc_error(
            self.get_tree(root), grpc.StatusCode.NOT_FOUND, str(absent)
        )

    @async_test
    async def test_root_not_a_directory(self):
        data, digest = make_blob(50, seed=b"\xff\xff\xff")
        await self.put_blobs((data, digest))

        await self.assert_rpc_error(
            self.get_tree(digest), grpc.StatusCode.INVALID_ARGUMENT, str(digest), "Directory"
        )

    @async_test
    async def test_empty_root_directory(self):
        pages = await self.get_tree(EMPTY_DIGEST)

        self.assertEqual(len(pages), 1)
        self.assertEqual(list(pages[0].directories), [re_pb2.Directory()])

    @async_test
    async def test_malformed_root_digest(self):
        await self.assert_rpc_error(
            self.cas.GetTree(
                re_pb2.GetTreeRequest(root_digest=re_pb2.Digest(hash="xyz", size_bytes=3))
            ).read(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "root_digest",
            "'xyz'",
        )

    @async_test
    async def test_unknown_instance(self):
        await self.assert_rpc_error(
            self.get_tree(EMPTY_DIGEST, instance_name="projects"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'projects'",
        )
