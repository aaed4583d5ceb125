"""Durable storage of the scheduler's records in named databases of the LMDB environment.

Five named databases hold the records, each value in the JSON form of
``bgrid.scheduler.codec``:

- ``scheduler-jobs``: jobs, keyed by job id.
- ``scheduler-operations``: operations, keyed by the last segment of the operation name.
- ``scheduler-bot-sessions``: bot sessions, keyed by the last segment of the session name.
- ``scheduler-leases``: leases, keyed by lease id.
- ``scheduler-meta``: one record under the key ``state``, with the format version and the
  next sequence number.

Operation and bot session names end in a uuid4 segment that is unique across instances,
so that segment is the key. Keys then stay far below LMDB's 511-byte limit, however long
the instance name is.
"""

from typing import NamedTuple

from zope.interface import Interface, implementer

JOBS = "jobs"
OPERATIONS = "operations"
BOT_SESSIONS = "bot_sessions"
LEASES = "leases"
META = "meta"

DATABASES = {
    JOBS: b"scheduler-jobs",
    OPERATIONS: b"scheduler-operations",
    BOT_SESSIONS: b"scheduler-bot-sessions",
    LEASES: b"scheduler-leases",
    META: b"scheduler-meta",
}
DATABASE_NAMES = tuple(DATABASES.values())

# The name under which the journal and the store know the one meta record.
META_NAME = "state"


class StoredRecords(NamedTuple):
    """Every stored record: lists of encoded values per kind, and the meta value or None."""

    jobs: list
    operations: list
    bot_sessions: list
    leases: list
    meta: object


def record_key(kind, name):
    """Return the LMDB key of the record ``name`` of ``kind``, one of the kinds above."""
    if kind in (OPERATIONS, BOT_SESSIONS):
        name = name.rsplit("/", 1)[-1]
    return name.encode("utf-8")


class ISchedulerStore(Interface):
    """Durable storage for the scheduler's records, written by ``Journal``."""

    def load():
        """Read every stored record.

        Returns a Deferred firing with a ``StoredRecords`` whose values are ``bytes``.
        """

    def commit(changes):
        """Apply ``changes`` in one transaction.

        ``changes`` is a list of ``(kind, name, value)``, where ``value`` is the encoded
        record as ``bytes``, or None to delete the record. Returns a Deferred firing with
        None once the transaction is committed. On failure nothing of the transaction is
        applied and the Deferred fails, with ``ResourceExhaustedError`` when storage is full.
        """


@implementer(ISchedulerStore)
class LmdbSchedulerStore:
    """The scheduler's records in an ``LmdbEnvironment`` opened with ``DATABASE_NAMES``.

    Nothing is opened here: the environment must be started before ``load`` and
    ``commit`` are called.
    """

    DATABASE_NAMES = DATABASE_NAMES

    def __init__(self, environment):
        self._environment = environment

    def load(self):
        handles = self._handles()

        def read_all(txn):
            values = {}
            for kind in (JOBS, OPERATIONS, BOT_SESSIONS, LEASES):
                with txn.cursor(db=handles[kind]) as cursor:
                    values[kind] = [bytes(value) for value in cursor.iternext(keys=False)]
            meta = txn.get(record_key(META, META_NAME), db=handles[META])
            return StoredRecords(
                values[JOBS],
                values[OPERATIONS],
                values[BOT_SESSIONS],
                values[LEASES],
                bytes(meta) if meta is not None else None,
            )

        return self._environment.read(read_all)

    def commit(self, changes):
        handles = self._handles()
        # The keys are computed here, on the reactor thread, so the write only copies bytes.
        writes = [
            (handles[kind], record_key(kind, name), value) for kind, name, value in changes
        ]

        def apply_changes(txn):
            for db, key, value in writes:
                if value is None:
                    txn.delete(key, db=db)
                else:
                    txn.put(key, value, db=db)

        return self._environment.write(apply_changes)

    def _handles(self):
        return {kind: self._environment.database(name) for kind, name in DATABASES.items()}
