"""Paged listing of operations in creation order, with opaque page tokens."""

import base64
import binascii
import bisect

from bgrid.errors import InvalidArgumentError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "bgrid-operations-after:"


def encode_page_token(sequence):
    """Return the page token that continues after the operation with ``sequence``."""
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{sequence}".encode()).decode("ascii")


def decode_page_token(token):
    """Return the sequence number in a page token made by ``encode_page_token``.

    Raises InvalidArgumentError naming the token when it is not such a token.
    """
    try:
        text = base64.b64decode(token, altchars=b"-_", validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        text = ""
    digits = text[len(_TOKEN_PREFIX):] if text.startswith(_TOKEN_PREFIX) else ""
    if not digits.isdigit() or not digits.isascii():
        raise InvalidArgumentError(
            f"invalid page_token {token!r}: pass a next_page_token that ListOperations "
            "returned, or an empty token for the first page"
        )
    return int(digits)


class OperationIndex:
    """Operation names per instance name, ordered by their creation sequence number."""

    def __init__(self):
        self._sequences = {}
        self._names = {}

    def add(self, instance_name, sequence, name):
        """Add an operation. Sequence numbers must grow with each call."""
        sequences = self._sequences.setdefault(instance_name, [])
        if sequences and sequences[-1] >= sequence:
            raise ValueError(f"operation sequence {sequence} is not above {sequences[-1]}")
        sequences.append(sequence)
        self._names[sequence] = name

    def remove(self, instance_name, sequence):
        # NOTE: deleting from the middle of a list costs O(n) in the instance's operations.
        # A memmove of a few hundred thousand entries is fast enough for operations that
        # are kept for an hour.
        sequences = self._sequences.get(instance_name, [])
        position = bisect.bisect_left(sequences, sequence)
        if position < len(sequences) and sequences[position] == sequence:
            del sequences[position]
            del self._names[sequence]
            if not sequences:
                del self._sequences[instance_name]

    def page(self, instance_name, after, page_size):
        """Return up to ``page_size`` names following sequence ``after``, and the next token.

        The token is "" on the last page. Removing operations between calls does not
        shift later pages, because a token names a sequence number, not a position.
        """
        sequences = self._sequences.get(instance_name, [])
        start = bisect.bisect_right(sequences, after)
        selected = sequences[start:start + page_size]
        names = [self._names[sequence] for sequence in selected]
        more = start + page_size < len(sequences)
        next_token = encode_page_token(selected[-1]) if more else ""
        return names, next_token
