"""Per-queue series stay bounded: a cap on queues labelled by name, and a queue's series leave with it."""

from __future__ import annotations

from runner.metrics import OTHER_QUEUES, Metrics


def queue_labels(metrics: Metrics) -> set[str]:
    text = metrics.render().decode()
    return {line.split('queue="')[1].split('"')[0] for line in text.splitlines() if 'queue="' in line}


def receive(metrics: Metrics, queue: str) -> None:
    metrics.messages_received.labels("local", metrics.queue(queue)).inc()
    metrics.tasks_finished.labels(metrics.queue(queue), "succeeded").inc()
    metrics.requeues.labels(metrics.queue(queue), "busy").inc()


def test_queues_beyond_the_limit_are_counted_together() -> None:
    metrics = Metrics(queue_label_limit=3)
    for n in range(10):
        receive(metrics, f"local_{n}")
    assert queue_labels(metrics) == {"local_0", "local_1", "local_2", OTHER_QUEUES}
    assert 'runner_messages_received_total{broker="local",queue="_other"} 7.0' in metrics.render().decode()


def test_a_queue_that_goes_away_takes_its_series_and_frees_its_label() -> None:
    metrics = Metrics(queue_label_limit=2)
    receive(metrics, "local_a")
    receive(metrics, "local_b")
    metrics.forget_queue("local_a")
    assert queue_labels(metrics) == {"local_b"}
    receive(metrics, "local_c")  # the freed label goes to the next new queue
    assert queue_labels(metrics) == {"local_b", "local_c"}


def test_a_gone_queue_keeps_its_running_gauge_until_its_last_experiment_ends() -> None:
    metrics = Metrics()
    metrics.experiment_started("local_a")
    metrics.forget_queue("local_a")
    assert 'runner_tasks_running{queue="local_a"} 1.0' in metrics.render().decode()
    metrics.experiment_ended("local_a")
    assert "local_a" not in metrics.render().decode()


def test_a_scrape_returns_to_its_size_after_thousands_of_queues_come_and_go() -> None:
    metrics = Metrics(queue_label_limit=200)
    before = len(metrics.render())
    for n in range(5006):
        receive(metrics, f"local_{n}")
    assert len(queue_labels(metrics)) == 201  # 200 by name and the rest together
    for n in range(5006):
        metrics.forget_queue(f"local_{n}")
    assert len(metrics.render()) <= before + 2000  # only the _other series remain
