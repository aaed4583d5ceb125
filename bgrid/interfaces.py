"""The contracts between bgrid's gRPC edge, its storage and its scheduler.

Every method returning a Deferred is called on the reactor thread and fires there.
Digests are ``bgrid.digest.Digest`` values, never protobuf messages, and failures are the
exceptions of ``bgrid.errors``.
"""

from zope.interface import Attribute, Interface


class IBlobStore(Interface):
    """A content-addressable store of blobs keyed by their SHA-256 digest.

    The empty blob is always present, whether or not it was ever written. Data given to
    ``put``, ``put_many`` and writers is checked against its digest before it becomes
    visible, and a blob is visible whole or not at all. A store may evict blobs to stay
    within a size limit, except blobs pinned with ``pin``, so a blob found once may be
    missing later.
    """

    def find_missing(digests):
        """Return a Deferred firing with the digests of ``digests`` that are not stored.

        Duplicates are reported once, in the order of their first occurrence. A call counts
        as an access to every blob found, for least-recently-used eviction.
        """

    def get(digest):
        """Return a Deferred firing with the whole blob as ``bytes``.

        Meant for small blobs (actions, commands, directories, trees). Fails with
        ``BlobNotFoundError`` when absent and ``CorruptBlobError`` when the stored data no
        longer matches the digest.
        """

    def get_many(digests):
        """Return a Deferred firing with one entry per digest, in order.

        Each entry is the blob's ``bytes`` or the ``BgridError`` that reading it raised
        (``BlobNotFoundError``, ``CorruptBlobError``). The whole batch is read in one
        storage transaction.
        """

    def put(digest, data):
        """Store ``data`` under ``digest`` and return a Deferred firing with None.

        Fails with ``DigestMismatchError`` when ``data`` does not hash to ``digest`` and
        with ``ResourceExhaustedError`` when the store cannot hold it: the blob is larger
        than the store's size limit, or pinned blobs fill it. Storing a blob that exists
        already succeeds.
        """

    def put_many(blobs):
        """Store a list of ``(digest, data)`` pairs in one storage transaction.

        Returns a Deferred firing with one entry per pair, in order: None on success or the
        ``BgridError`` for that pair. One bad blob does not stop the others. When the shared
        transaction fails to commit, each blob is stored in a transaction of its own.
        """

    def open_reader(digest, offset=0, limit=0):
        """Return a Deferred firing with an ``IBlobReader`` over part of a blob.

        ``offset`` and ``limit`` are in bytes; a ``limit`` of 0 reads to the end. Fails with
        ``BlobNotFoundError`` when the blob is absent, ``OutOfRangeError`` when ``offset``
        is negative or greater than its size, and ``InvalidArgumentError`` when ``limit``
        is negative.
        """

    def open_writer(digest):
        """Return an ``IBlobWriter`` that streams a blob of ``digest`` into the store.

        Nothing becomes visible until ``commit`` succeeds.
        """

    def pin(digests):
        """Protect the blobs of ``digests`` from eviction until ``unpin``.

        Returns a Deferred firing with an opaque token once no eviction that started
        before the call can still delete a pinned blob, so a ``find_missing`` made after
        it shows which of them stay stored. Pins are counted per blob: a blob pinned
        through two tokens stays protected until both are released. Pins live in memory
        and end with the process. Digests of blobs not stored yet may be pinned. A store
        that never evicts may fire at once. Fails with ``UnavailableError`` when the
        store is stopping, and then no pin remains.
        """

    def unpin(token):
        """Release the pins of ``token``, returned by ``pin``. A second call has no effect."""


class IBlobReader(Interface):
    """A sequential reader over a stored blob, opened by ``IBlobStore.open_reader``."""

    size = Attribute("The size in bytes of the whole blob.")

    def read(max_bytes):
        """Return a Deferred firing with the next at most ``max_bytes`` bytes.

        ``max_bytes`` must be positive, and the next call waits until this Deferred fired.
        Fires with ``b""`` at the end of the requested range. Data that fails its
        integrity check fails the Deferred with ``CorruptBlobError``.
        """

    def close():
        """Release the reader; further reads fail."""


class IBlobWriter(Interface):
    """A streamed upload of one blob, opened by ``IBlobStore.open_writer``."""

    digest = Attribute("The digest the written data must match.")
    committed_size = Attribute("Bytes accepted so far, including bytes still buffered.")

    def write(data):
        """Append ``data`` and return a Deferred that fires when the writer can take more.

        Fails with ``DigestMismatchError`` when the data would exceed the digest's size.
        """

    def commit():
        """Check the data against the digest and make the blob visible.

        Returns a Deferred firing with None. Fails with ``DigestMismatchError`` when the
        size or hash differs; the partial data is then discarded. Committing a blob that
        another writer stored meanwhile succeeds.
        """

    def abort():
        """Discard everything written so far; return a Deferred that fires once it is gone.

        Safe to call more than once, or after commit. After an abort, ``write`` and
        ``commit`` fail with ``CancelledError``; after a commit, ``write`` fails too.
        """


class IActionCache(Interface):
    """Results of executed actions, keyed by instance name and action digest."""

    def get(instance_name, action_digest):
        """Return a Deferred firing with the stored ``ActionResult`` message.

        Fails with ``NotFoundError`` when there is no result, or when a blob the result
        refers to is no longer in the CAS (so a client never gets a result it cannot
        download).
        """

    def put(instance_name, action_digest, action_result):
        """Store ``action_result`` for the action and return a Deferred firing with None."""
