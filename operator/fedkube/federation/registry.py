"""Who has joined the job: one session per client index, bound to the certificate that joined.

Pure bookkeeping without gRPC or threads (the aggregator's event loop owns it), so that
liveness, re-joins and revocation are testable alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

from fedkube import pki

#: A client that has not called for this long (and is not training) counts as gone.
LIVENESS_SECONDS = 30.0


@dataclass
class Session:
    """A joined client."""

    client_id: str
    index: int
    """The client's index among the job's clients (its data partition)."""
    identity: pki.Identity | None
    """The certificate's identity that joined (None with TLS disabled)."""
    last_seen: float


class Registry:
    """The joined clients, by client id."""

    def __init__(self, liveness_seconds: float = LIVENESS_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sessions: dict[str, Session] = {}
        self._liveness = liveness_seconds
        self._clock = clock

    def join(self, index: int, identity: pki.Identity | None) -> Session:
        """A new session for ``index``. A restarted client takes its index back (only its own
        site can hold that index), so an older session of the index ends."""
        for old in [s.client_id for s in self._sessions.values() if s.index == index]:
            del self._sessions[old]
        session = Session(f"client-{index}-{uuid.uuid4().hex[:8]}", index, identity,
                          self._clock())
        self._sessions[session.client_id] = session
        return session

    def of_index(self, index: int) -> Session | None:
        """The session holding ``index``, if any."""
        return next((s for s in self._sessions.values() if s.index == index), None)

    def get(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def index_of(self, client_id: str) -> int:
        """The index of a client that joined; -1 for one whose session ended."""
        session = self._sessions.get(client_id)
        return -1 if session is None else session.index

    def touch(self, session: Session) -> None:
        session.last_seen = self._clock()

    def live(self, busy: Collection[str] = ()) -> list[str]:
        """Client ids seen within the liveness window, or ``busy`` (training: silent while
        they work), in joining order."""
        now = self._clock()
        return [client_id for client_id, session in self._sessions.items()
                if now - session.last_seen < self._liveness or client_id in busy]

    def revoke(self, sites: Collection[str | None]) -> list[str]:
        """End the sessions of certificates of ``sites``; the client ids ended."""
        ended = [client_id for client_id, session in self._sessions.items()
                 if session.identity is not None and session.identity.site in sites]
        for client_id in ended:
            del self._sessions[client_id]
        return ended
