"""Time from FederatedJob creation to all child pods created, against the kmock emulator.

Runs the real kopf operator in-process. Prints: one job with 100 clients, and 100 jobs
(2 clients each) created at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from emulator import Cluster, operator_settings, running_operator, serve_emulator


async def time_until_pods(cluster: Cluster, want: int, timeout: float = 300) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if len(await cluster.list("pods")) >= want:
            return time.perf_counter() - start
        await asyncio.sleep(0.1)
    raise TimeoutError(f"fewer than {want} pods after {timeout}s")


async def one_scenario(jobs: int, replicas: int) -> float:
    async with serve_emulator() as (emulator, url), aiohttp.ClientSession() as session:
        cluster = Cluster(url, session)
        # The production resync interval: the tests' short one would add its own load.
        settings = dataclasses.replace(operator_settings(url), resync_seconds=10.0)
        async with running_operator(emulator, settings):
            spec = {"rounds": 1, "clients": {"replicas": replicas},
                    "strategy": {"minClients": 1}}
            start = time.perf_counter()
            await asyncio.gather(*(cluster.create_job(f"bench-{i}", spec)
                                   for i in range(jobs)))
            created = time.perf_counter() - start
            return created + await time_until_pods(cluster, jobs * (replicas + 1))


async def main() -> None:
    logging.getLogger("kopf").setLevel(logging.ERROR)
    single = await one_scenario(jobs=1, replicas=100)
    print(f"1 job x 100 clients: all 101 pods created in {single:.2f} s")
    many = await one_scenario(jobs=100, replicas=2)
    print(f"100 jobs x 2 clients at once: all 300 pods created in {many:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
