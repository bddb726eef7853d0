"""Rank 0's progress events on their own channels: a streaming task's, and the mailbox actor of a worker group's."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from orchestrator.events import EVENT, RESULT, take_events, worker_group_channel, yield_events

# One xdist worker for the module: its tests share one Ray in this process.
pytestmark = pytest.mark.xdist_group("events")


def test_yield_events_gives_every_event_in_order_then_the_result():
    def work(sink):
        for i in range(100):
            sink({"kind": "train", "step": i})
        return {"steps": 100}

    items = list(yield_events(work, stream=True))
    assert items == [(EVENT, {"kind": "train", "step": i}) for i in range(100)] + [(RESULT, {"steps": 100})]
    assert list(yield_events(lambda sink: sink, stream=False)) == [(RESULT, None)]  # no sink: the loop prints


def test_yield_events_raises_the_loops_exception_after_its_events():
    def work(sink):
        sink({"kind": "message", "text": "before"})
        raise ValueError("the loop broke")

    items = yield_events(work, stream=True)
    assert next(items) == (EVENT, {"kind": "message", "text": "before"})
    with pytest.raises(ValueError, match="the loop broke"):
        next(items)


def test_a_streaming_task_hands_over_its_events_in_order_before_its_result(ray_local):
    def task(n):
        def work(sink):
            for i in range(n):
                sink({"kind": "train", "step": i})
            return {"last": n - 1}

        yield from yield_events(work, stream=True)

    got: list[dict] = []
    result = take_events(ray.remote(num_returns="streaming")(task).remote(300), got.append)
    assert got == [{"kind": "train", "step": i} for i in range(300)] and result == {"last": 299}


def test_a_streaming_tasks_exception_reaches_the_driver_after_its_events(ray_local):
    def task():
        def work(sink):
            sink({"kind": "message", "text": "before"})
            raise ValueError("the loop broke")

        yield from yield_events(work, stream=True)

    got: list[dict] = []
    with pytest.raises(ValueError, match="the loop broke"):
        take_events(ray.remote(num_returns="streaming")(task).remote(), got.append)
    assert got == [{"kind": "message", "text": "before"}]


def test_the_mailbox_shows_events_while_the_fit_runs_and_all_of_them_when_settled(ray_local):
    got: list[dict] = []
    first_seen = threading.Event()

    def sink(event):
        got.append(event)
        first_seen.set()

    @ray.remote(num_cpus=0)
    def rank0(sender, n, go_on):
        # Another process, as Ray Train's rank 0 is: the first event, then the rest once the driver saw it.
        sender({"kind": "train", "step": 0})
        while not ray.get(go_on.is_set.remote()):
            time.sleep(0.05)
        for i in range(1, n):
            sender({"kind": "train", "step": i})
        sender.flush()  # as train_worker does before its loop returns

    @ray.remote(num_cpus=0)
    class Flag:
        def __init__(self):
            self.value = False

        def set(self):
            self.value = True

        def is_set(self):
            return self.value

    go_on = Flag.remote()
    with worker_group_channel(sink) as (sender, settle):
        done = rank0.remote(sender, 500, go_on)
        assert first_seen.wait(60), "no event reached the driver while the task ran"
        ray.get(go_on.set.remote())
        ray.get(done)
        settle()  # as the driver does before it says how an attempt ended: every event sent is shown by then
        assert got == [{"kind": "train", "step": i} for i in range(500)]
    assert len(got) == 500  # and none twice
