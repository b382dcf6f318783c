"""A small in-memory driver for the sans-IO server connection (no sockets, no loop).

``Driver`` feeds bytes, answers each command the way a plain accepting session
would, collects DATA/BDAT bytes into messages, and returns everything the
connection wrote. Tests of the protocol core build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ehlo import ProtocolLimits
from ehlo.extensions import build_extensions
from ehlo.protocol import (
    NEED_DATA,
    PAUSED,
    Bdat,
    Command,
    Data,
    DataChunk,
    DataEnd,
    Ehlo,
    Event,
    Fault,
    Helo,
    Quit,
    Reply,
    ServerConnection,
    StartTls,
)


@dataclass
class Driver:
    """Answers like an accepting server; records events, messages and output."""

    limits: ProtocolLimits = field(default_factory=ProtocolLimits)
    conn: ServerConnection = field(init=False)
    events: list[Event] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    overrides: dict[str, Reply] = field(default_factory=dict)
    _body: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.conn = ServerConnection(self.limits, build_extensions(self.limits))
        self.conn.send(Reply(220, None, "test ESMTP"))
        self.conn.data_to_send()

    def reply_for(self, event: Command) -> Reply:
        if event.verb in self.overrides:
            return self.overrides[event.verb]
        if isinstance(event, Ehlo):
            return Reply(250, None, ["test", *self.conn.extension_lines()])
        if isinstance(event, Helo):
            return Reply(250, None, "test")
        if isinstance(event, Data):
            return Reply(354, None, "go ahead")
        if isinstance(event, DataEnd):
            if event.last:
                self.messages.append(bytes(self._body))
                self._body.clear()
                return Reply(250, "2.0.0", "queued")
            return Reply(250, "2.0.0", "chunk ok")
        if isinstance(event, Quit):
            return Reply(221, "2.0.0", "bye")
        if isinstance(event, StartTls):
            return Reply(220, "2.0.0", "go TLS")
        return Reply(250, "2.0.0", "ok")

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            assert isinstance(event, Event)
            self.events.append(event)
            if isinstance(event, DataChunk):
                self._body += event.data
            elif isinstance(event, Fault):
                if event.aborted:
                    self._body.clear()
            elif isinstance(event, Bdat):
                if event.first:
                    self._body.clear()
            elif isinstance(event, Command):
                self.conn.send(self.reply_for(event))

    def feed(self, data: bytes) -> bytes:
        """Feed bytes, answer everything answerable, return the output."""
        self.conn.receive_data(data)
        self.pump()
        return self.conn.data_to_send()

    def feed_split(self, data: bytes, size: int) -> bytes:
        """Feed ``data`` in pieces of ``size`` bytes; return all output."""
        out = bytearray()
        for i in range(0, len(data), size):
            out += self.feed(data[i : i + size])
        return bytes(out)

    def say(self, line: str) -> str:
        """Send one command line; return the reply text."""
        return self.feed(line.encode("utf-8") + b"\r\n").decode("utf-8")


def codes(output: bytes | str) -> list[str]:
    """The final-line codes of every reply in ``output`` ("250", "503", ...)."""
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    return [line[:3] for line in text.split("\r\n") if len(line) >= 4 and line[3] == " "]


def greeted(limits: ProtocolLimits | None = None, verb: str = "EHLO") -> Driver:
    """A driver that already greeted with ``verb``."""
    driver = Driver(limits or ProtocolLimits())
    driver.say(f"{verb} client.example")
    return driver
