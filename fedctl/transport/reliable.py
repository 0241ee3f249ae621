"""Numbered, acknowledged control messages over a stream that may drop and come back.

Both ends of a site's session (server and agent) keep one :class:`ReliableLink`:

* every message sent with :meth:`send` gets the next sequence number and stays in the outbox
  until the peer acknowledges it (acks are cumulative);
* every numbered message received goes through :meth:`accept`, which answers with an ack and
  says whether it is new (a resent duplicate is acknowledged again but not processed twice);
* when a stream breaks, the link detaches; when a new stream attaches, what the peer already has
  is dropped from the outbox and the rest is sent again.

So a reconnect neither loses nor repeats a message. Heartbeats and acks themselves are not
numbered (:meth:`post`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any, TypeVar

from fedctl.codec import protocol
from fedctl.codec.protocol import Ack, Message, Numbered

N = TypeVar("N", bound=Numbered)


class ReliableLink:
    """One side's state of a reliable message exchange (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.next_seq = 1
        #: last numbered message from the peer that was processed
        self.recv_seq = 0
        self.outbox: OrderedDict[int, Numbered] = OrderedDict()
        #: the live stream's outgoing queue of encoded frames (None while disconnected)
        self.queue: Any = None

    @property
    def online(self) -> bool:
        return self.queue is not None

    def attach(self, queue: Any) -> None:
        """A new stream: later messages go to ``queue`` (call :meth:`resend` once it is ready)."""
        with self.lock:
            if self.queue is not None and self.queue is not queue:
                self.queue.put(None)  # close the older stream
            self.queue = queue

    def detach(self, queue: Any) -> None:
        """The stream of ``queue`` ended (a newer one may already have replaced it)."""
        with self.lock:
            if self.queue is queue:
                self.queue = None

    def close(self) -> None:
        """End the live stream, if any."""
        with self.lock:
            if self.queue is not None:
                self.queue.put(None)

    def post(self, msg: Message) -> None:
        """An unnumbered message (heartbeat, ack), dropped if there is no stream."""
        with self.lock:
            if self.queue is not None:
                self.queue.put(protocol.encode(msg))

    def send(self, msg: N) -> N:
        """A numbered message: delivered now or after the next reconnect."""
        with self.lock:
            msg = dataclasses.replace(msg, seq=self.next_seq)
            self.next_seq += 1
            self.outbox[msg.seq] = msg
            if self.queue is not None:
                self.queue.put(protocol.encode(msg))
            return msg

    def acked(self, seq: int) -> None:
        """The peer has everything up to ``seq``."""
        with self.lock:
            for s in [s for s in self.outbox if s <= seq]:
                del self.outbox[s]

    def accept(self, seq: int) -> bool:
        """Acknowledge a numbered message from the peer; True if it is new (process it)."""
        with self.lock:
            new = seq > self.recv_seq
            if new:
                self.recv_seq = seq
            self.post(Ack(self.recv_seq))
            return new

    def resend(self) -> None:
        """Send every unacknowledged message again, in order."""
        with self.lock:
            if self.queue is not None:
                for msg in self.outbox.values():
                    self.queue.put(protocol.encode(msg))

    def reset(self, *, incoming: bool = False, outgoing: bool = False) -> None:
        """Forget the peer's numbering (it restarted) and/or our undelivered messages."""
        with self.lock:
            if incoming:
                self.recv_seq = 0
            if outgoing:
                self.outbox.clear()
