"""``LISTEN`` for the hints other nodes send with ``NOTIFY`` (the interface only).

``Listener(url, callback)`` is what the store starts and closes: once
started it calls ``callback(channel, payload)`` in the running loop for
each notice on the store's channels. This version listens to nothing yet:
every reader still polls, which a missed notice requires anyway.
"""

from __future__ import annotations

from collections.abc import Callable


class Listener:
    """Calls ``callback(channel, payload)`` for the notices of the store's channels."""

    def __init__(self, url: str, callback: Callable[[str, str], None]) -> None:
        self.url = url
        self.callback = callback

    async def start(self) -> None:
        """Begin listening (in the running loop)."""

    async def close(self) -> None:
        """Stop listening."""
