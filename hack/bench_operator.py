"""The operator against the kmock emulator: time to children, and its cost at scale.

Prints: one job with 100 clients and 100 jobs (2 clients each) created at once, with the
operator in-process; then 1000 jobs (2 clients each) with the real ``fedkube operator``
command as a subprocess at the production 10 s resync (so that its RSS is its own): the time
until every child exists, the API requests per minute at steady state (counted by the
emulator over a window in which nothing changes; watches, which stay open, apart), the
operator's RSS, and the reconcile pass latency p50/p99 (from its
``fedkube_operator_reconcile_duration_seconds`` histogram: bucket bounds, interpolated).

``--quick`` runs each scenario at a toy size (the tests' smoke run).
``BENCH_JOBS`` and ``BENCH_WINDOW_SECONDS`` (default 1000 and 30) size the last scenario. It
needs the machine to itself: on 2 cores shared with other work, the emulator (one Python
process serving 4000 children) falls behind and passes wait on it for seconds.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from emulator import (
    Cluster,
    FedkubeEmulator,
    _watching,
    operator_settings,
    running_operator,
    serve_emulator,
)
from kmock._internal import enums
from prometheus_client import Histogram

from fedkube.api.constants import PLURAL

#: What the pre-cache operator cost, measured with 20 steady jobs (the issue): one GET of the
#: job, LIST pods, LIST secrets, GET ConfigMap/Service/NetworkPolicy per job per resync.
BEFORE_PER_JOB_PER_RESYNC = 5.4
HISTOGRAM = "fedkube_operator_reconcile_duration_seconds"


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


# --- the scale scenario --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _count(emulator: FedkubeEmulator, plural: str) -> int:
    return sum(1 for (resource, _, _), obj in list(emulator._objects.items())
               if resource.plural == plural and not obj.deleted)


def _all_have_status(emulator: FedkubeEmulator) -> bool:
    return all((obj.raw.get("status") or {}).get("phase")
               for (resource, _, _), obj in list(emulator._objects.items())
               if resource.plural == PLURAL and not obj.deleted)


def _calls(emulator: FedkubeEmulator, since: int) -> collections.Counter[str]:
    """Requests after the first ``since`` by verb and resource, watches apart."""
    return collections.Counter(
        f"{r.action.name} {r.resource.plural if r.resource else r.url.path}"
        for r in emulator._requests[since:] if r.action != enums.action.WATCH)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _buckets(session: aiohttp.ClientSession, port: int) -> dict[float, float]:
    """The pass-duration histogram's cumulative buckets, from the operator's /metrics."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{HISTOGRAM}_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def _quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus's histogram_quantile: linear within the bucket the quantile falls in."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return bound
            inside = buckets[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, buckets[bound]
    return lower


async def _wait(check: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout}s")
        await asyncio.sleep(0.2)


async def scale_scenario(jobs: int, replicas: int, window: float, resync: float) -> None:
    async with serve_emulator() as (emulator, url), aiohttp.ClientSession() as session:
        cluster = Cluster(url, session)
        port = _free_port()
        env = {**os.environ, "FEDKUBE_KUBE_SERVER": url, "FEDKUBE_RESYNC_SECONDS": str(resync),
               "FEDKUBE_STATUS_URL": f"http://127.0.0.1:{_free_port()}/status",
               "FEDKUBE_STATUS_TIMEOUT_SECONDS": "0.5"}
        fedkube = str(Path(sys.executable).with_name("fedkube"))
        with tempfile.TemporaryFile() as log:
            seen = len(emulator._requests)
            process = subprocess.Popen(
                [fedkube, "operator", "--standalone", f"--metrics-port={port}",
                 f"--liveness=http://127.0.0.1:{_free_port()}/healthz"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                await _wait(lambda: _watching(emulator, seen) or process.poll() is not None,
                            "the operator to watch", 60)
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the operator exited: {log.read()[-2000:]!r}")
                idle_rss = _rss_mib(process.pid)
                spec = {"rounds": 1, "clients": {"replicas": replicas},
                        "strategy": {"minClients": 1}}
                limit = asyncio.Semaphore(50)

                async def create(i: int) -> None:
                    async with limit:
                        await cluster.create_job(f"scale-{i}", spec)

                start, emulator_cpu = time.perf_counter(), time.process_time()
                operator_cpu = _cpu_seconds(process.pid)
                await asyncio.gather(*(create(i) for i in range(jobs)))
                await _wait(lambda: _count(emulator, "pods") >= jobs * (replicas + 1)
                            and _count(emulator, "services") >= jobs
                            and _count(emulator, "configmaps") >= jobs,
                            "all children", 240)
                children = time.perf_counter() - start
                await _wait(lambda: _all_have_status(emulator), "every job's status", 120)
                statused = time.perf_counter() - start
                operator_cpu = _cpu_seconds(process.pid) - operator_cpu
                emulator_cpu = time.process_time() - emulator_cpu
                # Settled: two resyncs past the last status write.
                await asyncio.sleep(2 * resync)
                mark, before = len(emulator._requests), await _buckets(session, port)
                began = time.perf_counter()
                await asyncio.sleep(window)
                elapsed = time.perf_counter() - began
                by_kind = _calls(emulator, mark)
                calls = sum(by_kind.values())
                watches = len(emulator._requests) - mark - calls
                after = await _buckets(session, port)
                rss = _rss_mib(process.pid)
            finally:
                process.terminate()  # it stops its watches on the emulator: keep serving
                deadline = time.monotonic() + 30
                while process.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                if process.poll() is None:
                    process.kill()
                    process.wait()
        steady = {b: after[b] - before.get(b, 0) for b in after}
        print(f"{jobs} jobs x {replicas} clients, fedkube operator subprocess, "
              f"resync {resync:g} s:")
        print(f"  all children ({jobs * (replicas + 1)} pods, {jobs} ConfigMaps, Services, "
              f"Secrets) exist {children:.1f} s after the first create; every status "
              f"written at {statused:.1f} s; CPU meanwhile: operator {operator_cpu:.0f} s, "
              f"emulator and this script {emulator_cpu:.0f} s")
        print(f"  steady state over {elapsed:.0f} s: {calls * 60 / elapsed:.1f} API requests/min "
              f"({calls} requests; {watches} watch (re)connects); before the watch caches: "
              f"~{BEFORE_PER_JOB_PER_RESYNC * jobs * 60 / resync:.0f}/min "
              f"({BEFORE_PER_JOB_PER_RESYNC} per job per resync, measured at 20 jobs)")
        if by_kind:
            print("    " + ", ".join(f"{what}: {n}" for what, n in by_kind.most_common()))
        print(f"  operator RSS: {rss:.0f} MiB at steady state ({idle_rss:.0f} MiB idle before "
              f"the jobs: {rss - idle_rss:.0f} MiB for {jobs} jobs)")
        total = after.get(float("inf"), 0)
        steady_total = steady.get(float("inf"), 0)
        print(f"  reconcile pass latency, all {total:.0f} passes: "
              f"p50 {_ms(_quantile(after, 0.5))}, p99 {_ms(_quantile(after, 0.99))}; "
              f"the {steady_total:.0f} steady passes: p50 {_ms(_quantile(steady, 0.5))}, "
              f"p99 {_ms(_quantile(steady, 0.99))} (histogram buckets, interpolated)")


def _ms(seconds: float) -> str:
    if seconds == float("inf"):
        top = Histogram.DEFAULT_BUCKETS[-2]  # the operator's histogram has the default ones
        return f"> {top:.0f} s (above the top bucket)"
    return f"{seconds * 1000:.1f} ms"


async def main(quick: bool) -> None:
    logging.getLogger("kopf").setLevel(logging.ERROR)
    clients, jobs = (5, 5) if quick else (100, 100)
    single = await one_scenario(jobs=1, replicas=clients)
    print(f"1 job x {clients} clients: all {clients + 1} pods created in {single:.2f} s")
    many = await one_scenario(jobs=jobs, replicas=2)
    print(f"{jobs} jobs x 2 clients at once: all {3 * jobs} pods created in {many:.2f} s")
    if quick:
        await scale_scenario(jobs=5, replicas=2, window=2, resync=1)
    else:
        await scale_scenario(jobs=int(os.environ.get("BENCH_JOBS", "1000")), replicas=2,
                             window=float(os.environ.get("BENCH_WINDOW_SECONDS", "30")),
                             resync=10)


if __name__ == "__main__":
    asyncio.run(main(quick="--quick" in sys.argv[1:]))
