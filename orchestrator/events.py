"""Rank 0's progress events, from wherever the loop runs to the driver's console: in order, and every one of them.

Ray's log forwarding is no channel for them. It tails each worker's log file on a schedule of its own,
with no order against what the driver prints, and what it has not yet forwarded when the driver
disconnects is lost: the last steps, the last validation and the test line of a run. So each executor
(executor.py) hands its events over on a channel made for it:

- `driver`, the loop in the driver's process (local mode): straight to the console;
- `task`, the loop in one Ray task: the task is a streaming generator (`yield_events`), which yields the
  events as the loop makes them and the loop's result last; the driver takes them in order (`take_events`);
- `group`, Ray Train's worker group: rank 0 sends them to a small actor of the driver's
  (`worker_group_channel`), which a thread of the driver empties; rank 0 waits for its last send before its
  loop returns, so that one more take after the fit gets the rest, and the driver takes what is there before
  it says how an attempt ended. The actor lives on the driver's node and asks for no CPU (it never waits for
  one); rank 0 reaches it by Ray's own connections between nodes (no port of ours to open between machines
  or pods).

Sweep trials use none of them: the sweep's live view and its ranking come from Tune's results, which
arrive in order; a trial's own lines are shown only with --verbose, through Ray's log forwarding, as a
look inside and no more.

This module imports neither torch nor ray at import time: the actor's process imports only it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Event = dict[str, Any]
Sink = Callable[[Event], None]

log = logging.getLogger(__name__)

EVENT, RESULT = "event", "result"
POLL_S = 0.2  # how often the driver takes the actor's events while the fit runs: the live display's latency
# How long rank 0 waits for its last event to reach the actor, and the driver for the actor's last events:
# the actor is on the driver's node and answers in milliseconds; longer means it or its node is gone.
DELIVERY_TIMEOUT_S = 30


def yield_events(work: Callable[[Sink | None], Any], stream: bool) -> Iterator[tuple[str, Any]]:
    """In a streaming Ray task: run `work(sink)` on a thread, yield (EVENT, event) for each event it sinks, then (RESULT, what it returned).

    Without `stream` the loop gets no sink (it prints its plain lines) and only the result is yielded.
    An exception of `work` is raised here, in the task's own thread, as a plain task would raise it.
    """
    items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def run() -> None:
        try:
            sink = (lambda event: items.put((EVENT, event))) if stream else None
            items.put((RESULT, work(sink)))
        except BaseException as exc:  # a user's sys.exit too: the task's thread raises it, as a plain task would
            items.put(("error", exc))

    # The loop runs beside the generator: a generator cannot yield from inside the loop's callbacks.
    threading.Thread(target=run, name="loop", daemon=True).start()
    while True:
        kind, value = items.get()
        if kind == "error":
            raise value
        yield kind, value
        if kind == RESULT:
            return


def take_events(generator, sink: Sink) -> Any:
    """In the driver: the result of a streaming task of `yield_events`, each of its events handed to `sink` in order first."""
    import ray

    result = None
    for ref in generator:
        kind, value = ray.get(ref)
        if kind == EVENT:
            sink(value)
        else:
            result = value
    return result


class EventMailbox:
    """The actor between rank 0 and the driver: the events sent, in the order they came, until the driver takes them.

    One thread (Ray's default for an actor): the calls of one caller run in the order they were made.
    """

    def __init__(self) -> None:
        self._events: list[Event] = []

    def put(self, event: Event) -> None:
        self._events.append(event)

    def take(self) -> list[Event]:
        events, self._events = self._events, []
        return events


class EventSender:
    """Rank 0's end of a `worker_group_channel`: each event sent without waiting; `flush` waits until the last one arrived."""

    def __init__(self, mailbox) -> None:
        self.mailbox = mailbox
        self._last = None

    def __call__(self, event: Event) -> None:
        try:
            self._last = self.mailbox.put.remote(event)
        except Exception as exc:  # progress is never a reason to stop training
            log.warning("a progress event could not be sent to the driver: %s", exc)

    def flush(self) -> None:
        """Wait until every event sent has reached the mailbox (the calls run in order: the last one says so)."""
        last, self._last = self._last, None
        if last is None:
            return
        import ray

        try:
            ray.get(last, timeout=DELIVERY_TIMEOUT_S)
        except Exception as exc:
            log.warning("the driver may miss the last progress events: %s", exc)


@contextmanager
def worker_group_channel(sink: Sink | None) -> Iterator[tuple[Sink | None, Callable[[], None]]]:
    """In the driver, around a Ray Train fit: (what rank 0 is handed for its events, `settle`).

    `settle` hands `sink` every event sent so far: the driver calls it before it says anything of an attempt's
    end, which rank 0's last events come before. A mailbox actor: a thread hands its events to `sink` as they
    come, and on leaving the rest are taken (rank 0 waited for its last send before its loop returned) and the
    actor is ended. Without a sink, no actor: rank 0 gets nothing (it prints its lines).
    """
    if sink is None:
        yield None, lambda: None
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    mailbox = (
        ray.remote(EventMailbox)
        .options(
            num_cpus=0,
            max_restarts=0,
            # On the driver's node, whose fate it shares: a worker node can go (a spot node, a killed pod) while the
            # run goes on. Not soft: Ray then put a mailbox beside a busy head on another node (seen on a 2-node cluster).
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote()
    )
    taking = threading.Lock()  # one take at a time, delivered whole: the thread's and a settle's never interleave
    gone: list[str] = []

    def take() -> None:
        with taking:
            if gone:
                return
            try:
                events = ray.get(mailbox.take.remote(), timeout=DELIVERY_TIMEOUT_S)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                return  # the actor's process is still starting, or out of reach for a moment (a busy machine)
            except Exception as exc:  # the actor is gone: the run goes on without its progress lines
                gone.append(type(exc).__name__)
                log.warning("progress events: the mailbox actor is gone (%s)", gone[0])
                return
            for event in events:
                sink(event)

    stop = threading.Event()

    def drain() -> None:
        while not stop.wait(POLL_S) and not gone:
            take()

    thread = threading.Thread(target=drain, name="progress-events", daemon=True)
    thread.start()
    try:
        yield EventSender(mailbox), take
    finally:
        stop.set()
        thread.join()
        take()
        ray.kill(mailbox)
