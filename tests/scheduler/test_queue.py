"""Tests of the job queue: priority, arrival order, matching and removal."""

import random

from twisted.trial import unittest

from bgrid.scheduler.queue import JobQueue

LINUX = (("os", "linux"),)
WINDOWS = (("os", "windows"),)
LINUX_BOT = frozenset(LINUX)
ANY_BOT = frozenset(LINUX + WINDOWS)


def drain(queue, property_set=ANY_BOT, instance_name=""):
    popped = []
    while (job_id := queue.pop_for(instance_name, property_set)) is not None:
        popped.append(job_id)
    return popped


class JobQueueTests(unittest.TestCase):
    def test_priority_then_arrival(self):
        queue = JobQueue()
        queue.push("late-urgent", "", (), -5, 3)
        queue.push("first", "", (), 0, 1)
        queue.push("second", "", (), 0, 2)
        queue.push("lazy", "", (), 10, 0)

        self.assertEqual(drain(queue), ["late-urgent", "first", "second", "lazy"])

    def test_bot_gets_only_matching_jobs(self):
        queue = JobQueue()
        queue.push("windows-job", "", WINDOWS, 0, 0)
        queue.push("linux-job", "", LINUX, 0, 1)

        self.assertEqual(drain(queue, LINUX_BOT), ["linux-job"])
        self.assertIn("windows-job", queue)
        self.assertEqual(len(queue), 1)

    def test_best_head_across_requirement_sets(self):
        queue = JobQueue()
        queue.push("linux-2", "", LINUX, 0, 2)
        queue.push("any-1", "", (), 0, 1)
        queue.push("linux-0", "", LINUX, 0, 0)
        queue.push("any-urgent", "", (), -1, 3)

        self.assertEqual(drain(queue, LINUX_BOT), ["any-urgent", "linux-0", "any-1", "linux-2"])

    def test_instances_are_separate(self):
        queue = JobQueue()
        queue.push("a-job", "a", (), 0, 0)
        queue.push("b-job", "b", (), 0, 1)

        self.assertEqual(drain(queue, instance_name="b"), ["b-job"])
        self.assertEqual(drain(queue, instance_name="a"), ["a-job"])

    def test_remove_skips_job(self):
        queue = JobQueue()
        queue.push("kept", "", (), 0, 0)
        queue.push("removed", "", (), 0, 1)

        self.assertTrue(queue.remove("removed"))
        self.assertFalse(queue.remove("removed"))
        self.assertEqual(drain(queue), ["kept"])

    def test_reprioritize_keeps_sequence(self):
        queue = JobQueue()
        queue.push("a", "", (), 5, 0)
        queue.push("b", "", (), 0, 1)
        queue.push("c", "", (), 0, 2)

        queue.reprioritize("c", -1)
        queue.reprioritize("a", 0)

        self.assertEqual(drain(queue), ["c", "a", "b"])

    def test_requeue_after_pop(self):
        queue = JobQueue()
        queue.push("a", "", (), 0, 0)
        queue.push("b", "", (), 0, 1)
        self.assertEqual(queue.pop_for("", ANY_BOT), "a")

        queue.push("a", "", (), 0, 0)

        self.assertEqual(drain(queue), ["a", "b"])

    def test_many_jobs_pop_in_order(self):
        generator = random.Random(7)
        queue = JobQueue()
        expected = []
        for sequence in range(10_000):
            priority = generator.randrange(-3, 4)
            requirements = generator.choice([(), LINUX, WINDOWS])
            job_id = f"job-{sequence}"
            queue.push(job_id, "", requirements, priority, sequence)
            expected.append((priority, sequence, job_id))
        removed = {f"job-{sequence}" for sequence in range(0, 10_000, 3)}
        for job_id in removed:
            queue.remove(job_id)

        popped = drain(queue)

        survivors = [job_id for _, _, job_id in sorted(expected) if job_id not in removed]
        self.assertEqual(popped, survivors)
        self.assertEqual(len(queue), 0)
