"""Soak: a 200-round job with client churn (``make test-slow``).

Clients are SIGKILLed at random and started again while the job runs. After warm-up the
aggregator's resident memory, open file descriptors and threads must be flat (their slopes,
fitted over the rounds, are reported and bounded), and round times must not drift.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import psutil
import pytest
from runtime_support import make_config, processes, status, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ROUNDS = 200
CLIENTS = 3
WARM_UP = 30
SEED = 7


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def test_two_hundred_rounds_with_churn_stay_flat(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    config = make_config(tmp_path, rounds=ROUNDS, clients=CLIENTS, min_clients=2, timeout=5,
                         task_config={"hidden": 16, "lr": 0.1})
    samples: list[tuple[int, int, int, int, float]] = []
    killed = 0
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        clients = [group.client(config, i) for i in range(CLIENTS)]
        process = psutil.Process(aggregator.pid)
        seen, last = 0, time.monotonic()
        while seen < ROUNDS:
            def progressed(since: int = seen) -> int | None:
                """The round reached past ``since``; -1 once the job finished and the
                aggregator exited (its last rounds may pass between two looks)."""
                if aggregator.poll() is not None:
                    return -1
                reached = int(status(config)["round"])
                return reached if reached > since else None

            current = wait_for(progressed, 120, f"round {seen + 1}")
            if current == -1:
                break
            now = time.monotonic()
            try:
                samples.append((current, process.memory_info().rss, process.num_fds(),
                                process.num_threads(), (now - last) / (current - seen)))
            except psutil.NoSuchProcess:
                break  # finished between the look at its round and the sample
            seen, last = current, now
            if seen < ROUNDS - 5 and rng.random() < 0.15:  # churn: one client dies, returns
                index = rng.randrange(CLIENTS)
                clients[index].kill()
                clients[index].wait()
                clients[index] = group.client(config, index)
                killed += 1
        assert aggregator.wait(60) == 0, group.log("aggregator")
    steady = [s for s in samples if s[0] > WARM_UP]
    rounds = [float(s[0]) for s in steady]
    rss_slope = slope(rounds, [s[1] / 2**20 for s in steady])
    fd_slope = slope(rounds, [float(s[2]) for s in steady])
    thread_slope = slope(rounds, [float(s[3]) for s in steady])
    times = [s[4] for s in steady]
    early, late = statistics.median(times[:len(times) // 3]), \
        statistics.median(times[-len(times) // 3:])
    print(f"soak: {ROUNDS} rounds, {killed} clients killed and restarted; after round "
          f"{WARM_UP}: RSS slope {rss_slope * 100:+.2f} MiB per 100 rounds "
          f"({min(s[1] for s in steady) >> 20}-{max(s[1] for s in steady) >> 20} MiB), fds "
          f"{min(s[2] for s in steady)}-{max(s[2] for s in steady)} (slope "
          f"{fd_slope * 100:+.2f}/100 rounds), threads {min(s[3] for s in steady)}-"
          f"{max(s[3] for s in steady)} (slope {thread_slope * 100:+.2f}/100 rounds), median "
          f"round time {early:.3f} s early vs {late:.3f} s late")
    assert killed >= 10
    assert rss_slope * 100 < 8, "aggregator memory grows with rounds"
    assert abs(fd_slope) * 100 < 2 and abs(thread_slope) * 100 < 2
    assert late < 2 * early + 0.5, "round times drift"
