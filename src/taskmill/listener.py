"""Wake a manager when PostgreSQL notifies it of a new task or request.

``crud.notify()`` sends ``"<event> <task_id>"`` (``"control PAUSE <task_id>"``
for a request) on the ``taskmill`` channel when a write commits. A listener
opens one connection of its own with ``LISTEN taskmill`` and passes each
event to its manager. Notifications
are only a wake-up: a listener that loses its connection reconnects with
backoff, and the manager's poll finds whatever it missed meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from taskmill.crud import CHANNEL
from taskmill.database import Database

logger = logging.getLogger(__name__)

#: Seconds between checks of the stop flag while no notification arrives.
_STOP_CHECK_INTERVAL = 0.1
#: The maximum wait, in seconds, between two tries to reconnect.
_MAX_RECONNECT_BACKOFF = 5.0


class Listener:
    """A thread that calls ``on_event(event, task_id)`` for each notification."""

    def __init__(
        self, database: Database, on_event: Callable[[str, str], None]
    ) -> None:
        self.database = database
        self.on_event = on_event
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._listen_forever, name="taskmill-listener", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=_STOP_CHECK_INTERVAL * 4)

    def _listen_forever(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                connection = self._connect()
                try:
                    connection.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        logger.info(
                            "Listening for notifications again after %d failed tries",
                            failures,
                            extra={"event": "listener.recovered"},
                        )
                        # Tasks stored while the connection was down sent no
                        # notification that reached here.
                        self.on_event("pending", "")
                    failures = 0
                    self._receive(connection)
                finally:
                    connection.close()
            except Exception as exc:
                # Log the first failure of each outage, not one per try.
                if not failures:
                    logger.warning(
                        "Listening for notifications failed (%s); polling meanwhile, "
                        "reconnecting with backoff",
                        exc,
                        extra={"event": "listener.failed"},
                    )
                failures += 1
                backoff = min(0.1 * 2 ** min(failures, 16), _MAX_RECONNECT_BACKOFF)
                self._stopping.wait(backoff)

    def _receive(self, connection: Any) -> None:
        """Pass notifications on until the listener stops or the connection fails."""
        while not self._stopping.is_set():
            for notification in connection.notifies(timeout=_STOP_CHECK_INTERVAL):
                event, _, task_id = notification.payload.partition(" ")
                self.on_event(event, task_id.rpartition(" ")[2])

    def _connect(self) -> Any:
        """Open a psycopg connection, outside the pool, with the engine's settings."""
        dialect = self.database.engine.dialect
        args, kwargs = dialect.create_connect_args(self.database.engine.url)
        connection = dialect.loaded_dbapi.connect(*args, **kwargs, autocommit=True)
        return connection
