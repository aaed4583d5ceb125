"""Platform requirements of actions, platform properties of bots, and how they match.

Both are canonical tuples of ``(name, value)`` string pairs: sorted, without duplicates.
A name may occur with several values, and a requirement name listed several times needs
every one of its values.
"""

from bgrid.errors import InvalidArgumentError


def normalize_properties(pairs, field="platform"):
    """Return ``(name, value)`` pairs as a sorted tuple without duplicates.

    The result is hashable, so jobs with the same requirements share one queue. Raises
    InvalidArgumentError naming ``field`` when a name or value is not a string or a name
    is empty.
    """
    normalized = set()
    for pair in pairs:
        name, value = pair
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidArgumentError(
                f"{field}: invalid property {pair!r}: name and value must be strings"
            )
        if not name:
            raise InvalidArgumentError(
                f"{field}: invalid property with value {value!r}: the name is empty"
            )
        normalized.add((name, value))
    return tuple(sorted(normalized))


def worker_properties(worker):
    """Return the platform properties of a remoteworkers ``Worker`` message.

    They are the worker's own properties and those of every one of its devices, because a
    bot may describe an attached device (a GPU, say) as a device of its own.
    """
    pairs = [(prop.key, prop.value) for prop in worker.properties]
    for device in worker.devices:
        pairs.extend((prop.key, prop.value) for prop in device.properties)
    return normalize_properties(pairs, field="bot_session.worker")


def satisfies(property_set, requirements):
    """Return whether a bot with ``property_set`` (a frozenset of pairs) can run a job.

    Every required pair must be among the bot's properties, compared as exact strings.
    """
    return all(pair in property_set for pair in requirements)
