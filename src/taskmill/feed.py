"""The change feed: task changes read from the database, for live streams.

Several processes may share the database, so changes are read from it rather
than from this process's memory. While at least one subscriber is connected,
one thread per feed (one feed per database and process) polls every
``interval`` seconds for rows whose ``updated_at`` changed, with one indexed
query, and hands the changed tasks to every subscriber. A subscriber keeps
only the latest version of each task that it has not read yet, so a task that
changes many times between two reads reaches it once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from taskmill import crud
from taskmill.database import Database
from taskmill.models import BackgroundTaskModel, TaskEventModel
from taskmill.schemas import TaskEventInfo, TaskInfo
from taskmill.status import TaskStatus

logger = logging.getLogger(__name__)

#: Seconds between two polls of the database while subscribers are connected.
POLL_INTERVAL = 0.3
#: Seconds that each poll looks back before the newest ``updated_at`` it has
#: seen, for writes that commit after a later write. A write that commits
#: more than this after it took its ``updated_at`` (one that waited that long
#: for the database's lock) is not streamed.
OVERLAP = 10.0
#: Minimum seconds between two recounts of the tasks per status.
COUNTS_INTERVAL = 1.0
#: Changed tasks that a subscriber may have unread before it gets a reload
#: event in their place; also the largest number of rows that one poll loads.
MAX_PENDING = 500

_tasks = BackgroundTaskModel


@dataclass
class Batch:
    """The changes that a subscriber has not read yet."""

    #: The latest version of each changed task, oldest change first.
    tasks: list[TaskInfo] = field(default_factory=list)
    #: New history rows of the subscribed task, oldest first.
    events: list[TaskEventInfo] = field(default_factory=list)
    #: Tasks per status, when they were counted since the last read.
    counts: dict[TaskStatus, int] | None = None
    #: True when more tasks changed than a batch holds: reload the list.
    reload: bool = False
    #: True when the stream should end, because the server is stopping.
    closed: bool = False


class Subscription:
    """One stream's view of a ``ChangeFeed``: all tasks, or the one with ``task_id``.

    Create it with ``ChangeFeed.subscribe()`` on the event loop that awaits
    ``next_batch()``, and close it (or leave its ``with`` block) when the
    stream ends.
    """

    def __init__(
        self, feed: ChangeFeed, task_id: str | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.task_id = task_id
        self._feed = feed
        self._loop = loop
        self._ready = asyncio.Event()
        self._lock = threading.Lock()
        self._pending = Batch()
        self._tasks: dict[str, TaskInfo] = {}

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._feed._unsubscribe(self)

    async def next_batch(self) -> Batch:
        """Wait until something changed, then return it all."""
        await self._ready.wait()
        self._ready.clear()
        with self._lock:
            batch, self._pending = self._pending, Batch()
            batch.tasks = sorted(self._tasks.values(), key=_change_order)
            self._tasks = {}
        return batch

    def _deliver(
        self,
        tasks: Sequence[TaskInfo],
        events: Sequence[TaskEventInfo],
        counts: dict[TaskStatus, int] | None,
        reload: bool,
    ) -> bool:
        """Add changes from the poller thread; return False if the loop is gone."""
        with self._lock:
            for task in tasks:
                self._tasks[task.id] = task
            if reload or len(self._tasks) > MAX_PENDING:
                self._tasks.clear()
                self._pending.reload = True
            self._pending.events.extend(events)
            if counts is not None:
                self._pending.counts = counts
        return self._wake()

    def _close(self) -> None:
        with self._lock:
            self._pending.closed = True
        self._wake()

    def _wake(self) -> bool:
        """Wake the reader; return False if its loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:
            return False  # The loop was closed, so no stream reads this any more.
        return True


class ChangeFeed:
    """Polls ``database`` for task changes while subscribers are connected."""

    def __init__(
        self,
        database: Database,
        *,
        interval: float = POLL_INTERVAL,
        overlap: float = OVERLAP,
    ) -> None:
        self.database = database
        self.interval = interval
        self.overlap = overlap
        self._lock = threading.Lock()
        # Weak, so that a stream whose generator was dropped without being
        # closed cannot keep its subscription, or the poller, alive.
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._counts_requested = False
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscriptions)

    @property
    def is_polling(self) -> bool:
        with self._lock:
            return self._thread is not None

    def subscribe(self, task_id: str | None = None) -> Subscription:
        """Subscribe to the changes of all tasks, or of the task with ``task_id``.

        Must be called on the event loop that reads the subscription. A
        subscription to all tasks receives the counts per status first.
        """
        subscription = Subscription(self, task_id, asyncio.get_running_loop())
        with self._lock:
            self._subscriptions.add(subscription)
            if task_id is None:
                self._counts_requested = True
            if self._thread is None:
                self._wake.clear()
                self._thread = threading.Thread(
                    target=self._poll_forever, name="taskmill-feed", daemon=True
                )
                self._thread.start()
        return subscription

    def close_subscriptions(self) -> None:
        """Tell every current subscriber that its stream should end."""
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription._close()

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)
            if not self._subscriptions:
                self._wake.set()  # Lets the poller see at once that it may stop.

    def _poll_forever(self) -> None:
        poller = _Poller(self.database, self.overlap)
        failing = False
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            with self._lock:
                subscriptions = list(self._subscriptions)
                if not subscriptions:
                    self._thread = None
                    return
                counts_requested, self._counts_requested = self._counts_requested, False
            try:
                self._poll_once(poller, subscriptions, counts_requested)
                failing = False
            except Exception:
                if counts_requested:
                    with self._lock:
                        self._counts_requested = True
                # Log the first failure in a row, not one per interval.
                if not failing:
                    logger.warning(
                        "Reading task changes failed; retrying every %g s",
                        self.interval,
                        exc_info=True,
                        extra={"event": "feed.poll_failed"},
                    )
                failing = True

    def _poll_once(
        self,
        poller: _Poller,
        subscriptions: list[Subscription],
        counts_requested: bool,
    ) -> None:
        watched = {s.task_id for s in subscriptions if s.task_id is not None}
        with self.database.read() as session:
            changes = poller.poll(session, watched)
            wants_counts = any(s.task_id is None for s in subscriptions)
            counts = (
                poller.count(session)
                if wants_counts and (counts_requested or poller.counts_due())
                else None
            )
        if not (changes.tasks or changes.reload or counts is not None):
            return
        by_id = {task.id: task for task in changes.tasks}
        unreachable: list[Subscription] = []
        for subscription in subscriptions:
            if subscription.task_id is None:
                delivered = subscription._deliver(
                    changes.tasks, [], counts, changes.reload
                )
            elif subscription.task_id in by_id:
                task_id = subscription.task_id
                events = [e for e in changes.events if e.task_id == task_id]
                delivered = subscription._deliver([by_id[task_id]], events, None, False)
            else:
                continue
            if not delivered:
                unreachable.append(subscription)
        for subscription in unreachable:
            self._unsubscribe(subscription)


@dataclass
class _Changes:
    tasks: list[TaskInfo]
    events: list[TaskEventInfo]
    reload: bool


class _Poller:
    """The state that one polling thread keeps between polls."""

    def __init__(self, database: Database, overlap: float) -> None:
        self.database = database
        self.overlap = dt.timedelta(seconds=overlap)
        #: The newest ``updated_at`` seen; the database's clock at the first poll.
        self.newest: dt.datetime | None = None
        #: ``updated_at`` of the rows seen within the overlap, by task id.
        self.seen: dict[str, dt.datetime] = {}
        #: The last status seen of those rows, to tell when to recount.
        self.statuses: dict[str, TaskStatus] = {}
        #: The newest history row sent, per watched task.
        self.event_cursors: dict[str, int] = {}
        self.counts_dirty = False
        self.counted_at = 0.0

    def poll(self, session: Session, watched: set[str]) -> _Changes:
        # updated_at comes from the database's clock, so the start does too.
        newest = self.newest or crud.read_clock(session)
        since = newest - self.overlap
        rows = session.execute(
            select(_tasks.id, _tasks.updated_at).where(_tasks.updated_at >= since)
        ).all()
        changed = [row.id for row in rows if self.seen.get(row.id) != row.updated_at]
        for row in rows:
            self.seen[row.id] = row.updated_at
            newest = max(newest, row.updated_at)
        self.newest = newest
        self._forget_before(newest - self.overlap)
        for task_id in list(self.event_cursors):
            if task_id not in watched:
                del self.event_cursors[task_id]
        reload = len(changed) > MAX_PENDING
        if reload:
            # Too many to load: list subscribers get a reload event, and only
            # the watched tasks are loaded.
            self.counts_dirty = True
            changed = [task_id for task_id in changed if task_id in watched]
        tasks = self._load(session, changed)
        events = self._load_events(session, [t.id for t in tasks if t.id in watched])
        return _Changes(tasks, events, reload)

    def counts_due(self) -> bool:
        return self.counts_dirty and time.monotonic() - self.counted_at >= (
            COUNTS_INTERVAL
        )

    def count(self, session: Session) -> dict[TaskStatus, int]:
        rows = session.execute(
            select(_tasks.status, func.count()).group_by(_tasks.status)
        ).all()
        self.counts_dirty = False
        self.counted_at = time.monotonic()
        counts = dict.fromkeys(TaskStatus, 0)
        for status, number in rows:
            counts[status] = number
        return counts

    def _forget_before(self, since: dt.datetime) -> None:
        for task_id in [k for k, updated in self.seen.items() if updated < since]:
            del self.seen[task_id]
            self.statuses.pop(task_id, None)

    def _load(self, session: Session, task_ids: list[str]) -> list[TaskInfo]:
        tasks: list[TaskInfo] = []
        for chunk in _chunks(task_ids, 200):
            rows = session.scalars(select(_tasks).where(_tasks.id.in_(chunk)))
            tasks.extend(TaskInfo.model_validate(row) for row in rows)
        for task in tasks:
            if self.statuses.get(task.id) != task.status:
                self.counts_dirty = True
            self.statuses[task.id] = task.status
        return tasks

    def _load_events(
        self, session: Session, task_ids: list[str]
    ) -> list[TaskEventInfo]:
        if not task_ids:
            return []
        after = min(self.event_cursors.get(task_id, 0) for task_id in task_ids)
        rows = session.scalars(
            select(TaskEventModel)
            .where(TaskEventModel.task_id.in_(task_ids), TaskEventModel.id > after)
            .order_by(TaskEventModel.id)
        )
        events = [
            TaskEventInfo.model_validate(row)
            for row in rows
            if row.id > self.event_cursors.get(row.task_id, 0)
        ]
        for event in events:
            self.event_cursors[event.task_id] = event.id
        return events


def _change_order(task: TaskInfo) -> tuple[dt.datetime, str]:
    return task.updated_at, task.id


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_feeds: weakref.WeakKeyDictionary[Database, ChangeFeed] = weakref.WeakKeyDictionary()
_feeds_lock = threading.Lock()


def feed_for(database: Database) -> ChangeFeed:
    """Return this process's change feed of ``database``, created on first use."""
    with _feeds_lock:
        feed = _feeds.get(database)
        if feed is None:
            feed = _feeds[database] = ChangeFeed(database)
        return feed


def close_streams() -> None:
    """End the open event streams of this process, so that a server can stop.

    uvicorn waits for open connections before it runs an app's shutdown, and
    an event stream stays open for as long as its browser tab does. Browsers
    reconnect an ended stream after a moment, to this server if it still
    runs, or to another.
    """
    with _feeds_lock:
        feeds = list(_feeds.values())
    for feed in feeds:
        feed.close_subscriptions()
