"""Why a queued job waits: no open bot session of its instance can run it.

The scheduler attaches a ``NoMatchingBot`` reason to such a job and shows it in the
``ExecuteOperationMetadata`` of the job's operations as a ``google.rpc.ErrorInfo``, packed
into ``partial_execution_metadata.auxiliary_metadata``, because that message has no
free-text field. The ErrorInfo has reason ``NO_MATCHING_BOT``, domain ``bgrid`` and the
metadata keys:

- ``platform``: the job's platform requirements as ``NAME=VALUE`` pairs joined by ``,``,
  in sorted order. It is empty for a job without requirements, which waits only while no
  bot session of its instance is open.
- ``missing``: the requirements that no open bot session of the instance offers at all, in
  the same format. The key is absent when each requirement is offered by some session and
  only their combination is missing.

Names or values that contain ``,`` or ``=`` make the joined text ambiguous: it is meant
for people, and a program can read the requirements from the Action.
"""

import collections
from typing import NamedTuple

from google.rpc import error_details_pb2

from bgrid.scheduler.platform import satisfies

# The ErrorInfo reason and domain. bgrid.cli.operations recognizes the same strings.
NO_MATCHING_BOT = "NO_MATCHING_BOT"
ERROR_DOMAIN = "bgrid"


def format_properties(pairs):
    """Return ``(name, value)`` pairs as ``NAME=VALUE`` joined by commas."""
    return ",".join(f"{name}={value}" for name, value in pairs)


class NoMatchingBot(NamedTuple):
    """The reason a queued job waits: no open bot session of its instance satisfies it.

    ``requirements`` is the job's canonical tuple of ``(name, value)`` pairs and ``missing``
    the pairs among them that no open session of the instance offers.
    """

    requirements: tuple
    missing: tuple

    def to_error_info(self):
        """Return the reason as a ``google.rpc.ErrorInfo`` in the format described above."""
        info = error_details_pb2.ErrorInfo(reason=NO_MATCHING_BOT, domain=ERROR_DOMAIN)
        info.metadata["platform"] = format_properties(self.requirements)
        if self.missing:
            info.metadata["missing"] = format_properties(self.missing)
        return info


class OpenSessions:
    """The number of open bot sessions per instance and property set.

    A session counts whatever its status, from CreateBotSession until it is closed.
    """

    def __init__(self):
        # instance name -> Counter of property sets (frozensets of pairs).
        self._counts = {}

    def add(self, instance_name, property_set):
        self._counts.setdefault(instance_name, collections.Counter())[property_set] += 1

    def remove(self, instance_name, property_set):
        counts = self._counts[instance_name]
        counts[property_set] -= 1
        if counts[property_set] <= 0:
            del counts[property_set]
        if not counts:
            del self._counts[instance_name]

    def waiting_reason(self, instance_name, requirements):
        """Return a ``NoMatchingBot`` when no open session can run a job, else None.

        It costs one match test per distinct property set among the instance's sessions.
        """
        property_sets = self._counts.get(instance_name, {})
        if any(satisfies(property_set, requirements) for property_set in property_sets):
            return None
        offered = set()
        for property_set in property_sets:
            offered.update(property_set)
        missing = tuple(pair for pair in requirements if pair not in offered)
        return NoMatchingBot(requirements, missing)
