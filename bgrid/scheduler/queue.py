"""The queue of jobs waiting for a bot, ordered by priority and then by arrival.

Jobs are grouped by their queue key, ``(instance_name, requirements)``, and each group is a
binary heap of ``(priority, sequence, job_id)``. Pushing, removing and popping cost
O(log n) in the number of queued jobs, plus one match test per distinct queue key when a bot
looks for work. Deployments have few distinct keys, because bots and actions draw their
properties from a short list.
"""

import heapq

from bgrid.scheduler.platform import satisfies


class JobQueue:
    """Queued job ids with the priority, sequence and queue key each was pushed with.

    A smaller ``priority`` runs sooner. Among equal priorities the smaller ``sequence``, which
    is the earlier submission, runs first. The queue stores only ids and ordering keys, so it can
    be rebuilt from the job records after a restart.
    """

    # Heaps are rebuilt once they carry this many stale entries beyond twice the live ones.
    _COMPACTION_SLACK = 1024

    def __init__(self):
        self._heaps = {}
        self._entries = {}
        # Queue key -> set of the job ids queued under it, without stale entries.
        self._members = {}
        self._heap_items = 0

    def __len__(self):
        return len(self._entries)

    def __contains__(self, job_id):
        return job_id in self._entries

    def push(self, job_id, instance_name, requirements, priority, sequence):
        """Queue a job. A job that is queued already is moved to its new place."""
        key = (instance_name, requirements)
        self._forget_member(job_id)
        self._entries[job_id] = (key, priority, sequence)
        self._members.setdefault(key, set()).add(job_id)
        heapq.heappush(self._heaps.setdefault(key, []), (priority, sequence, job_id))
        self._heap_items += 1
        self._compact_if_stale()

    def remove(self, job_id):
        """Remove a job and return whether it was queued."""
        # The heap entry stays behind and is skipped when it reaches the top, because removing
        # from the middle of a heap would cost O(n).
        return self._forget_member(job_id)

    def reprioritize(self, job_id, priority):
        """Give a queued job a new priority, keeping its sequence."""
        key, _, sequence = self._entries[job_id]
        self.push(job_id, key[0], key[1], priority, sequence)

    def keys(self):
        """Return the distinct queue keys, ``(instance_name, requirements)``, of queued jobs."""
        return list(self._members)

    def job_ids(self, key):
        """Return the ids of the jobs queued under ``key``, in no particular order."""
        return list(self._members.get(key, ()))

    def pop_for(self, instance_name, property_set):
        """Remove and return the first job a bot of ``instance_name`` can run, or None.

        ``property_set`` is the frozenset of the bot's ``(name, value)`` properties.
        """
        best_key = None
        best_head = None
        for key in list(self._heaps):
            head = self._live_head(key)
            if head is None or key[0] != instance_name or not satisfies(property_set, key[1]):
                continue
            if best_head is None or head < best_head:
                best_key, best_head = key, head
        if best_key is None:
            return None
        heapq.heappop(self._heaps[best_key])
        self._heap_items -= 1
        job_id = best_head[2]
        self._forget_member(job_id)
        return job_id

    def _forget_member(self, job_id):
        """Remove a job from the entries and the members; return whether it was queued."""
        entry = self._entries.pop(job_id, None)
        if entry is None:
            return False
        key = entry[0]
        members = self._members[key]
        members.discard(job_id)
        if not members:
            del self._members[key]
        return True

    def _live_head(self, key):
        """Drop stale entries from the top of a heap and return its first live entry."""
        heap = self._heaps[key]
        while heap:
            priority, sequence, job_id = heap[0]
            if self._entries.get(job_id) == (key, priority, sequence):
                return heap[0]
            heapq.heappop(heap)
            self._heap_items -= 1
        del self._heaps[key]
        return None

    def _compact_if_stale(self):
        if self._heap_items <= 2 * len(self._entries) + self._COMPACTION_SLACK:
            return
        heaps = {}
        for job_id, (key, priority, sequence) in self._entries.items():
            heaps.setdefault(key, []).append((priority, sequence, job_id))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._heaps = heaps
        self._heap_items = len(self._entries)
