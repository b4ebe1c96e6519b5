"""One real aggregator against 10, 100 and 1000 lightweight clients: round time, RSS, threads
and descriptors.

The aggregator serves every client on ``grpc.aio`` (a long-polling client is a suspended
coroutine, not a thread) and holds a bounded number of uploads in memory at once, so with a
small model its memory and thread count must not grow with the number of clients; only
descriptors do (one socket per client). For each client count N this starts a real
``fedkube aggregator`` process (FedAvg, ``clients.replicas = minClients = N``, a
~100K-parameter linear model with a cheap central evaluation, mutual TLS) and N lightweight
clients as coroutines spread over a few worker processes (this file with ``--worker``).
Every client has its own ``grpc.aio`` channel, so its own TCP connection and TLS session,
with the job's client certificate; it joins, then long-polls ``PullTask`` and pushes each
model it is sent back slightly perturbed, until told the job is FINISHED.

Measured, per N:

- *joined in*: from the moment the workers start connecting until the last client's ``Join``
  returned (handshakes are throttled to a few in flight per worker: two cores serve them all);
- *round*: the median ``duration_seconds`` of rounds 2..n in the aggregator's
  ``history.json`` (round 1 includes waiting for the clients to join; with one round, it is
  round 1's);
- *steady RSS / threads / fds*: the aggregator's ``VmRSS`` and ``Threads`` from
  ``/proc/PID/status`` and its ``/proc/PID/fd`` entries, sampled every 0.2 s; steady means
  from the last client's join until the first client is told FINISHED (the rounds). RSS is the
  window's maximum, threads and fds the maximum over the process's whole life;
- *peak RSS* and CPU time: what the kernel accounted to the process when it is reaped
  (``wait4``), so nothing between two samples is missed.

Prints a table and the ratios between the largest and the smallest N; exits 1 when the
aggregator's peak RSS at the largest N exceeds 1.2x that at the smallest, when its thread
count grows, or when a run fails (an aggregator error or warning, a client call that failed or
did not finish, an update not accepted). ``--quick`` (5 and 20 clients, one round) is a smoke
test: it fails only when a run does.

    python hack/bench_aggregator_scale.py [--clients 10,100,1000] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from bench_aggregator_memory import LinearTask  # noqa: E402
from runtime_support import ENV, make_config  # noqa: E402

import fedkube  # noqa: E402
from fedkube.api import TransportSpec  # noqa: E402
from fedkube.api.runtime import RuntimeConfig  # noqa: E402
from fedkube.federation import protocol, transport  # noqa: E402
from fedkube.federation.proto import fedkube_pb2 as pb  # noqa: E402
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc  # noqa: E402
from fedkube.federation.security import TlsFiles, channel_credentials  # noqa: E402
from fedkube.local import client_tls_dir  # noqa: E402

DEFAULT_CLIENTS = (10, 100, 1000)
QUICK_CLIENTS = (5, 20)
DEFAULT_ROUNDS = 3
#: Limit of (peak RSS at the most clients) / (peak RSS at the fewest).
RSS_LIMIT = 1.2
#: Client worker processes (each runs its share of the clients as coroutines).
WORKERS = 4
#: Joins (TCP connect, TLS handshake, Join) in flight at once per worker process.
JOINS_IN_FLIGHT = 8
ROUND_TIMEOUT_SECONDS = 300
SAMPLE_SECONDS = 0.2
POLL_WAIT_SECONDS = 5.0
#: Deadlines of the clients' calls: a Join waits for the aggregator and the other handshakes;
#: a push may wait behind the other clients' uploads.
JOIN_TIMEOUT_SECONDS = 300.0
PULL_TIMEOUT_SECONDS = 120.0
PUSH_TIMEOUT_SECONDS = float(ROUND_TIMEOUT_SECONDS)
#: Consecutive failed calls after which a client gives up.
MAX_CONSECUTIVE_ERRORS = 5
#: Longest the aggregator may take to start listening, and a whole job.
START_TIMEOUT_SECONDS = 120.0
JOB_TIMEOUT_SECONDS = 3600.0
#: Longest a worker may take to exit after the aggregator did: its clients give up after
#: :data:`MAX_CONSECUTIVE_ERRORS` failed calls a second apart.
WORKER_EXIT_SECONDS = 60.0

log = logging.getLogger("bench.scale")


#: A ~100K-parameter model (395 KB): the bench measures the serving of clients.
task = LinearTask(256, 384)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (inherited by the
    processes it starts): 1000 connections need more than the usual 1024. The new limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---- clients: worker processes --------------------------------------------------------------


@dataclass
class WorkerReport:
    """What one worker process's clients did (times are ``time.time()``)."""

    clients: int = 0
    started: float = 0.0
    """When the first client started connecting."""
    joined: int = 0
    last_join: float = 0.0
    first_finished: float = 0.0
    finished: int = 0
    trained: int = 0
    pushes: dict[str, int] = field(default_factory=dict)
    """Replies to PushUpdate by status (ACCEPTED, REJECTED, LATE)."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failed calls by gRPC status code."""
    failures: list[str] = field(default_factory=list)
    """Clients that gave up, and why (the first few)."""


class Client:
    """One lightweight client: its own channel (connection and TLS session), a real client's
    protocol, no training."""

    def __init__(self, index: int, address: str, credentials: grpc.ChannelCredentials,
                 transport_spec: TransportSpec, report: WorkerReport) -> None:
        self.index = index
        self.address = address
        self.credentials = credentials
        self.transport = transport_spec
        self.report = report
        self.metadata: tuple[tuple[str, str], ...] = ()

    async def run(self, joins: asyncio.Semaphore) -> None:
        options = [*protocol.channel_options(self.transport.largest_chunk),
                   ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(self.address, self.credentials,
                                           options=options) as channel:
            stub = pb_grpc.FederationStub(channel)
            async with joins:  # the channel connects (and handshakes) on its first call
                await self._join(stub)
            self.report.joined += 1
            self.report.last_join = max(self.report.last_join, time.time())
            errors = 0
            while True:
                try:
                    if await self._step(stub):
                        return
                    errors = 0
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    self.report.errors[code.name] = self.report.errors.get(code.name, 0) + 1
                    errors += 1
                    log.warning("client %d: %s: %s", self.index, code.name, error.details())
                    if errors >= MAX_CONSECUTIVE_ERRORS:
                        if len(self.report.failures) < 10:
                            self.report.failures.append(
                                f"client {self.index}: {code.name}: {error.details()}")
                        return
                    if code == grpc.StatusCode.NOT_FOUND:  # the aggregator forgot this client
                        await self._join(stub)
                    await asyncio.sleep(1.0)  # back off before trying again

    async def _join(self, stub: pb_grpc.FederationStub) -> None:
        reply = await stub.Join(pb.JoinRequest(index=self.index), wait_for_ready=True,
                                timeout=JOIN_TIMEOUT_SECONDS)
        self.metadata = ((protocol.CLIENT_ID_KEY, reply.client_id),)

    async def _step(self, stub: pb_grpc.FederationStub) -> bool:
        """One long poll and its answer; whether the job is finished."""
        call = stub.PullTask(pb.PullTaskRequest(wait_seconds=POLL_WAIT_SECONDS),
                             metadata=self.metadata, timeout=PULL_TIMEOUT_SECONDS)
        header: pb.TaskHeader | None = None
        data: list[bytes] = []
        async for message in call:
            if header is None:
                header = message.header
            else:
                data.append(message.data)
        if header is None or header.action == pb.TaskHeader.WAIT:
            return False
        if header.action == pb.TaskHeader.FINISHED:
            self.report.finished += 1
            now = time.time()
            if not self.report.first_finished or now < self.report.first_finished:
                self.report.first_finished = now
            return True
        if header.action == pb.TaskHeader.EVALUATE:  # not asked for: the task evaluates centrally
            await stub.PushEvaluation(pb.EvaluationReport(round=header.round, num_examples=1,
                                                          loss=1.0, accuracy=0.5),
                                      metadata=self.metadata, timeout=PULL_TIMEOUT_SECONDS)
            return False
        state = transport.assemble(protocol.from_specs(header.tensors), data)
        del data
        for tensor in state.values():
            tensor.add_(0.001 * (self.index + 1))
        self.report.trained += 1
        reply = await stub.PushUpdate(self._update(header.round, state), metadata=self.metadata,
                                      timeout=PUSH_TIMEOUT_SECONDS)
        status = pb.PushUpdateReply.Status.Name(reply.status)
        self.report.pushes[status] = self.report.pushes.get(status, 0) + 1
        if reply.status != pb.PushUpdateReply.ACCEPTED:
            log.warning("client %d: update for round %d %s: %s", self.index, header.round,
                        status, reply.reason)
        return False

    async def _update(self, round_: int, state: dict[str, torch.Tensor],
                      ) -> AsyncIterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=pb.UpdateHeader(
            round=round_, num_examples=10 + self.index,
            tensors=protocol.to_specs(transport.manifest(state))))
        chunk_bytes = self.transport.chunk_size(transport.encoded_nbytes(state))
        for chunk in transport.iter_chunks(state, chunk_bytes):
            yield pb.UpdateChunk(data=chunk)


async def run_worker(config: Path, indices: range) -> WorkerReport:
    """Clients ``indices`` of the job of ``config``, all in this process's event loop."""
    runtime = RuntimeConfig.from_file(config)
    credentials = channel_credentials(TlsFiles.read(client_tls_dir(config.parent / "tls",
                                                                   None)))
    report = WorkerReport(clients=len(indices), started=time.time())
    joins = asyncio.Semaphore(JOINS_IN_FLIGHT)
    clients = [Client(index, runtime.aggregator_address, credentials,
                      runtime.spec.transport, report) for index in indices]
    outcomes = await asyncio.gather(*(client.run(joins) for client in clients),
                                    return_exceptions=True)
    for index, outcome in zip(indices, outcomes, strict=True):
        if isinstance(outcome, BaseException) and len(report.failures) < 10:
            report.failures.append(f"client {index}: {outcome!r}")
    return report


def worker_main(config: Path, first: int, stop: int) -> int:
    """A worker process: prints its :class:`WorkerReport` as JSON; 0 when every client was
    told the job is finished."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s worker %(levelname)s %(message)s")
    raise_open_files_limit()
    torch.set_num_threads(1)
    report = asyncio.run(run_worker(config, range(first, stop)))
    print(json.dumps(asdict(report)), flush=True)
    return 0 if report.finished == report.clients else 1


# ---- the aggregator: run, sample, reap ------------------------------------------------------


class Sample(NamedTuple):
    at: float
    """``time.time()``"""
    rss: int
    threads: int
    pool_threads: int
    """Threads of gRPC core's EventEngine pool (named ``event_engine``), which gRPC grows and
    shrinks with its load."""
    fds: int


def read_proc(pid: int) -> Sample | None:
    """The process's RSS (bytes), threads and open descriptors now; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        names = []
        for thread in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):  # the thread ended meanwhile
                names.append(Path(f"/proc/{pid}/task/{thread}/comm").read_text().strip())
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie: exited, not yet reaped
        return None
    return Sample(time.time(), int(fields["VmRSS"].split()[0]) * 1024,
                  int(fields["Threads"]), names.count("event_engine"), fds)


class Sampler(threading.Thread):
    """Samples a process every :data:`SAMPLE_SECONDS` until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid = pid
        self.samples: list[Sample] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            sample = read_proc(self.pid)
            if sample is not None:
                self.samples.append(sample)
            self.stopped.wait(SAMPLE_SECONDS)


class Usage(NamedTuple):
    """What the kernel accounted to the aggregator process over its whole life."""

    peak_rss: int
    cpu_seconds: float


def reap(aggregator: subprocess.Popen[bytes], workers: Sequence[subprocess.Popen[bytes]],
         timeout: float) -> Usage:
    """Wait for the aggregator to exit (0) and return its usage; fails early when a worker
    fails first, since the job then cannot finish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, wait_status, usage = os.wait4(aggregator.pid, os.WNOHANG)
        if pid:
            aggregator.returncode = os.waitstatus_to_exitcode(wait_status)
            if aggregator.returncode != 0:
                raise RuntimeError(f"the aggregator exited with {aggregator.returncode}")
            return Usage(usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)
        failed = [w for w in workers if w.poll() is not None and w.returncode != 0]
        if failed:
            raise RuntimeError(f"client worker {failed[0].pid} exited with "
                               f"{failed[0].returncode} while the job ran")
        time.sleep(0.05)
    raise TimeoutError(f"the aggregator did not finish within {timeout:.0f}s")


def wait_listening(aggregator: subprocess.Popen[bytes], log_path: Path) -> None:
    """Until the aggregator logs that it listens (it imports torch and builds the model
    first); without polling its HTTP server, whose per-request threads would be counted."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while " listening on " not in log_path.read_text(errors="replace"):
        if aggregator.poll() is not None:
            raise RuntimeError(f"the aggregator exited with {aggregator.returncode} at start")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the aggregator did not listen within {START_TIMEOUT_SECONDS}s")
        time.sleep(0.05)


@dataclass
class Result:
    """One run of the job with ``clients`` clients."""

    clients: int
    join_seconds: float
    round_seconds: float
    round_durations: list[float]
    joined_rss: int
    """RSS at the first sample after the last join (the connections, no model sent yet)."""
    steady_rss: int
    peak_rss: int
    max_threads: int
    max_pool_threads: int
    max_fds: int
    cpu_seconds: float
    wall_seconds: float
    problems: list[str]
    """Why the run is not clean (client errors, updates not accepted, aggregator warnings)."""


def collect(worker: subprocess.Popen[bytes]) -> WorkerReport:
    """A worker's report, once its clients have all been told FINISHED (the aggregator keeps
    answering FINISHED for a grace period) or have given up."""
    try:
        out, _ = worker.communicate(timeout=WORKER_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"client worker {worker.pid} did not exit within "
                           f"{WORKER_EXIT_SECONDS:.0f}s after the aggregator") from None
    if not out.strip():
        raise RuntimeError(f"client worker {worker.pid} exited with {worker.returncode} "
                           "without a report")
    return WorkerReport(**json.loads(out))


def split(clients: int, workers: int) -> list[range]:
    """Client indices ``0..clients`` in at most ``workers`` contiguous, near-equal parts."""
    parts = min(workers, clients)
    bounds = [clients * part // parts for part in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def aggregator_complaints(log_text: str) -> list[str]:
    """The aggregator's WARNING and ERROR lines, counted by message (minus the client id)."""
    counts: Counter[str] = Counter()
    for line in log_text.splitlines():
        for level in (" aggregator WARNING ", " aggregator ERROR "):
            if level in line:
                message = line.split(level, 1)[1]
                counts[level.split()[1] + " " + " ".join(
                    "client-*" if word.startswith("client-") else word
                    for word in message.split())] += 1
    return [f"{count}x {message}" for message, count in counts.most_common(5)]


def measure(clients: int, rounds: int, workers: int, keep: Path | None) -> Result:
    """Run the job with ``clients`` clients (in ``keep``, or a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix=f"scale-{clients}-") as folder:
        tmp = keep / f"clients-{clients}" if keep else Path(folder)
        if keep:  # a checkpoint left there would resume a finished job
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        config = make_config(tmp, rounds=rounds, clients=clients, min_clients=clients,
                             timeout=ROUND_TIMEOUT_SECONDS, task_config={})
        config.write_text(config.read_text().replace("fedkube.tasks.digits:task",
                                                     f"{Path(__file__).stem}:task"))
        here = str(Path(__file__).resolve().parent)  # the aggregator imports the task from it
        env = ENV | {"PYTHONPATH": os.pathsep.join(
            part for part in (here, ENV.get("PYTHONPATH", "")) if part)}
        aggregator_log = tmp / "aggregator.log"
        started = time.monotonic()
        with aggregator_log.open("wb") as stream:
            aggregator = subprocess.Popen(
                [sys.executable, "-m", "fedkube.cli", "aggregator", "--config", str(config)],
                stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = Sampler(aggregator.pid)
        sampler.start()
        processes: list[subprocess.Popen[bytes]] = []
        try:
            wait_listening(aggregator, aggregator_log)
            for number, indices in enumerate(split(clients, workers)):
                with (tmp / f"worker-{number}.log").open("wb") as stream:
                    processes.append(subprocess.Popen(
                        [sys.executable, __file__, "--worker", str(config),
                         "--indices", f"{indices.start}:{indices.stop}"],
                        stdout=subprocess.PIPE, stderr=stream, env=env,
                        start_new_session=True))
            usage = reap(aggregator, processes, JOB_TIMEOUT_SECONDS)
            wall = time.monotonic() - started
            reports = [collect(process) for process in processes]
        except (RuntimeError, TimeoutError) as error:
            tail = aggregator_log.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError("\n    ".join([str(error), "aggregator log, last lines:", *tail])
                               ) from error
        finally:
            sampler.stopped.set()
            for process in (aggregator, *processes):
                if process.poll() is None:
                    process.kill()
                    process.wait()
        history = json.loads((tmp / "output" / "history.json").read_text())
        return summarize(clients, rounds, history, reports, sampler.samples, usage, wall,
                         aggregator_log.read_text(errors="replace"))


def summarize(clients: int, rounds: int, history: list[dict[str, Any]],
              reports: list[WorkerReport], samples: list[Sample], usage: Usage,
              wall: float, aggregator_log: str) -> Result:
    durations = [float(entry["duration_seconds"]) for entry in history]
    joined = max(r.last_join for r in reports)
    finished = min(r.first_finished for r in reports if r.first_finished) \
        if any(r.first_finished for r in reports) else samples[-1].at
    steady = [s for s in samples if joined <= s.at <= finished] or \
        [s for s in samples if s.at >= joined] or samples
    problems: list[str] = []
    errors: Counter[str] = Counter()
    pushes: Counter[str] = Counter()
    for report in reports:
        errors.update(report.errors)
        pushes.update(report.pushes)
        problems += report.failures
    if errors:
        problems.append(f"client call errors: {dict(errors)}")
    if pushes.get("ACCEPTED", 0) != clients * rounds or len(pushes) > 1:
        problems.append(f"updates: {dict(pushes)}, expected {clients * rounds} ACCEPTED")
    if sum(r.finished for r in reports) != clients:
        problems.append(f"{sum(r.finished for r in reports)} of {clients} clients told FINISHED")
    incomplete = [e["round"] for e in history if e["clients"] != clients or e["rejected"]]
    if len(history) != rounds or incomplete:
        problems.append(f"history: {len(history)} rounds, rounds without all {clients} "
                        f"clients accepted: {incomplete}")
    problems += aggregator_complaints(aggregator_log)
    return Result(
        clients=clients,
        join_seconds=joined - min(r.started for r in reports),
        round_seconds=statistics.median(durations[1:] or durations),
        round_durations=durations,
        joined_rss=next((s.rss for s in samples if s.at >= joined), samples[-1].rss),
        steady_rss=max(s.rss for s in steady),
        peak_rss=usage.peak_rss,
        max_threads=max(s.threads for s in samples),
        max_pool_threads=max(s.pool_threads for s in samples),
        max_fds=max(s.fds for s in samples),
        cpu_seconds=usage.cpu_seconds,
        wall_seconds=wall,
        problems=problems)


def print_table(results: Sequence[Result], rounds: int) -> None:
    mib = 2 ** 20
    print(f"fedkube from {Path(fedkube.__file__).parent}, grpcio {grpc.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"aggregator, FedAvg, ~100K-parameter model, {rounds} round(s), mutual TLS; "
          f"round = median of rounds 2..{rounds}" if rounds > 1 else
          "aggregator, FedAvg, ~100K-parameter model, 1 round (includes joins), mutual TLS")
    print("RSS in MiB: when all joined / steady (max during the rounds) / peak (wait4); "
          "threads: max (of which gRPC's EventEngine pool)")
    print(f"{'clients':>7} {'joined in':>9} {'round':>7} {'RSS joined':>10} {'steady':>7} "
          f"{'peak':>7} {'threads':>8} {'fds':>5} {'agg CPU':>7} {'wall':>5}  rounds (s)")
    for r in results:
        print(f"{r.clients:7d} {r.join_seconds:8.1f}s {r.round_seconds:6.2f}s "
              f"{r.joined_rss / mib:10.1f} {r.steady_rss / mib:7.1f} {r.peak_rss / mib:7.1f} "
              f"{r.max_threads:3d} ({r.max_pool_threads:2d}) {r.max_fds:5d} "
              f"{r.cpu_seconds:6.1f}s {r.wall_seconds:4.0f}s  "
              + " ".join(f"{d:.2f}" for d in r.round_durations))
    for r in results:
        for problem in r.problems:
            print(f"  {r.clients} clients: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default=",".join(map(str, DEFAULT_CLIENTS)),
                        help="comma-separated client counts (default: %(default)s; at most "
                             "1000, the spec's maximum of clients.replicas)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="rounds per job (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help="client worker processes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke test: clients {','.join(map(str, QUICK_CLIENTS))}, "
                             "1 round; fails only when a run does")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep the logs")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--indices", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        first, stop = map(int, args.indices.split(":"))
        return worker_main(args.worker, first, stop)
    counts = list(QUICK_CLIENTS) if args.quick else [int(c) for c in args.clients.split(",")]
    rounds = 1 if args.quick else args.rounds
    limit = raise_open_files_limit()
    if max(counts) * 2 + 256 > limit:
        print(f"warning: open files are limited to {limit}, {max(counts)} clients may need "
              f"{max(counts) * 2 + 256}", file=sys.stderr)
    results, crashed = [], []
    for clients in counts:
        print(f"running {clients} clients, {rounds} round(s)...", file=sys.stderr, flush=True)
        try:
            results.append(measure(clients, rounds, args.workers, args.keep))
        except (RuntimeError, TimeoutError, OSError, ValueError) as error:
            print(f"FAIL: {clients} clients: {error}", file=sys.stderr)
            crashed.append(clients)
    if len(results) < 2:
        return 1
    print_table(results, rounds)
    few, many = results[0], results[-1]
    ratio = many.peak_rss / few.peak_rss
    steady_ratio = many.steady_rss / few.steady_rss
    growth = many.max_threads - few.max_threads
    print(f"peak RSS ratio {many.clients}/{few.clients}: {ratio:.3f} (limit {RSS_LIMIT:.2f}); "
          f"steady RSS ratio {steady_ratio:.3f}; threads({many.clients}) - "
          f"threads({few.clients}): {growth:+d} (limit 0)")
    failed = crashed + [r.clients for r in results if r.problems]
    if failed:
        print(f"FAIL: runs with problems: {failed}")
    if args.quick:  # a smoke test: too few clients for the limits to mean anything
        return 1 if failed else 0
    if ratio > RSS_LIMIT:
        print("FAIL: aggregator memory grows with the number of clients")
    if growth > 0:
        print("FAIL: aggregator threads grow with the number of clients")
    return 1 if failed or ratio > RSS_LIMIT or growth > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
