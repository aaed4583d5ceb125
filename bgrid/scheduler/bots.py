"""Bot session records and the index of idle bots waiting in a long poll."""

import itertools
import uuid

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2
from bgrid.scheduler.platform import satisfies

# Bots in these states may be given new leases. A bot that leaves its status unset counts
# as OK.
STATUSES_ACCEPTING_WORK = frozenset({bots_pb2.BOT_STATUS_UNSPECIFIED, bots_pb2.OK})


def new_session_name(parent):
    """Return a fresh bot session name, ``{parent}/botSessions/{uuid4}``."""
    if parent:
        return f"{parent}/botSessions/{uuid.uuid4()}"
    return f"botSessions/{uuid.uuid4()}"


class BotSession:
    """One bot's session: who it is, what it offers, and the lease it holds, if any.

    ``instance_name`` is the session's parent, and the bot gets only that instance's jobs.
    ``properties`` is the canonical tuple of the bot's ``(name, value)`` platform properties.
    ``lease_id`` is the one lease of the session or None. ``has_news`` is True while the
    bot has not yet been sent a lease assignment or cancellation.
    ``last_update_time`` is the clock time of the last CreateBotSession or UpdateBotSession.
    """

    def __init__(self, name, bot_id, instance_name, worker, properties, status, now):
        self.name = name
        self.bot_id = bot_id
        self.instance_name = instance_name
        self.worker = worker_pb2.Worker()
        self.worker.CopyFrom(worker)
        self.properties = properties
        self.status = status
        self.lease_id = None
        self.has_news = False
        self.last_update_time = now

    @property
    def properties(self):
        return self._properties

    @properties.setter
    def properties(self, properties):
        self._properties = properties
        self.property_set = frozenset(properties)

    def update_worker(self, worker, properties):
        """Store a copy of the bot's new ``Worker`` message and its platform properties."""
        self.worker.CopyFrom(worker)
        self.properties = properties

    @property
    def accepts_work(self):
        return self.lease_id is None and self.status in STATUSES_ACCEPTING_WORK

    def to_proto(self, leases, expire_time):
        """Return the session as a ``bots_pb2.BotSession`` with ``leases`` and ``expire_time``."""
        message = bots_pb2.BotSession(
            name=self.name,
            bot_id=self.bot_id,
            status=self.status,
            leases=leases,
        )
        message.worker.CopyFrom(self.worker)
        message.expire_time.CopyFrom(expire_time)
        return message


class IdleBots:
    """Bot sessions without a lease that are waiting in a long poll, oldest first.

    Sessions are grouped by instance and property set. A new job goes to the session that
    has waited longest among the groups that can run it, at a cost of one match test per
    distinct group.
    """

    def __init__(self):
        self._groups = {}
        self._group_of = {}
        self._arrivals = itertools.count()

    def __contains__(self, session_name):
        return session_name in self._group_of

    def __len__(self):
        return len(self._group_of)

    def add(self, session):
        group = (session.instance_name, session.property_set)
        self._group_of[session.name] = group
        self._groups.setdefault(group, {})[session.name] = next(self._arrivals)

    def discard(self, session_name):
        group = self._group_of.pop(session_name, None)
        if group is None:
            return
        members = self._groups[group]
        del members[session_name]
        if not members:
            del self._groups[group]

    def pick(self, instance_name, requirements):
        """Return the name of the longest-waiting session that can run a job, or None."""
        best_name = None
        best_arrival = None
        for (group_instance, property_set), members in self._groups.items():
            if group_instance != instance_name or not satisfies(property_set, requirements):
                continue
            # Dicts keep insertion order, so the first member is the one waiting longest.
            name, arrival = next(iter(members.items()))
            if best_arrival is None or arrival < best_arrival:
                best_name, best_arrival = name, arrival
        return best_name
