"""Whole-system FedAvg round: fedkube against Flower's deployment engine, side by side.

Both sides run the same job on this machine: FedAvg of one model, 4 clients that do no
training (each returns the model it received plus 0.001, weighing 10 examples), every client
in every round, no evaluation, for ``--rounds`` rounds per model size. The model is 4 dense
layers (a ``width x width`` float32 weight and a ``width`` bias each) of about ``--sizes``
million parameters in all.

fedkube (``.venv``), over mutual TLS as in production:
  one aggregator process, ``python -m fedkube.cli aggregator --config CONFIG``, and 4 client
  processes, ``python -m fedkube.cli client --config CONFIG --index I --tls-dir DIR``, with
  the certificates ``fedkube run`` writes. With ``--plaintext``, in plaintext on both sides
  (``security.tls.mode: Disabled``, clients without ``--tls-dir``). The task is
  :class:`NoTrainingTask` in this file (entrypoint ``bench_whole_round:task``,
  ``PYTHONPATH=hack``): a ``torch.nn.Sequential`` of 4 ``Linear(width, width)``; no central
  test set. The job checkpoints only after its last round (``checkpoint.everyRounds =
  rounds``; Flower saves nothing), all else is the spec's defaults.

Flower (``--flower-python``'s virtualenv, Flower 1.41), over HTTPS on 127.0.0.1 as its TLS
guide sets it up (a CA and a server certificate for 127.0.0.1, issued here; server-side TLS,
Flower's SuperNodes present no certificate), or plain HTTP with ``--plaintext``:
  ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
  server.key --disable-runtime-dependency-installation`` (``--insecure`` instead of the
  certificates with ``--plaintext``; it serves its Fleet, Control and Runtime APIs on one
  port and starts a ``flower-superexec``, which starts one ``flwr-serverapp`` process for the
  run; the ServerApp reaches the SuperLink over the same HTTPS), 4 ``flower-supernode
  --root-certificates ca.crt`` (each starts a ``flower-superexec`` that runs the ClientApp
  in a ``flwr-clientapp`` process per message), and ``flwr run hack/flower_bench_app`` with
  ``root-certificates`` in its configuration. The
  app's ServerApp runs Flower's message-API FedAvg (``flwr.serverapp.strategy.FedAvg``,
  ``fraction_train=1``, ``fraction_evaluate=0``, all 4 nodes) from numpy arrays of the same
  shapes; its ClientApp returns the received arrays plus 0.001 with ``num-examples`` 10.
  Flower splits arrays into 5 MiB chunks itself, so no message size limit needs raising.

Measured, per side and size:
  seconds per round: fedkube's ``history.json`` ``duration_seconds`` (from waiting for the
  round's clients to the new global model); Flower's from the ServerApp's own clock (from
  FedAvg configuring the round, before it samples nodes, to the aggregate existing). Round 1
  also includes the clients' start-up on both sides, so the headline is the mean of rounds
  2..N (of round 1 with ``--rounds 1``).
  server-side peak RSS and CPU seconds: fedkube's aggregator process, from ``wait4`` when it
  exits; Flower's SuperLink with its SuperExec and ``flwr-serverapp`` (the ServerApp does
  the aggregation, the SuperLink stores and relays every message), read from /proc every
  0.1 s (with any short-lived helper they spawn): the peak of their summed RSS, and their
  summed user+system CPU time. CPU seconds
  cover each process's whole life (start-up, all rounds, fedkube's final save). The clients
  and the ``flwr run`` command are not counted.
  model copies: 1 + (peak RSS - idle RSS) / model bytes, the idle RSS being the server
  side's before round 1, which holds the global model once: the aggregator's once it answers
  ``/status`` (its model built, no client started); Flower's summed RSS in the last sample
  before its round 1 (the ServerApp started, its initial arrays built). The rest of the idle
  RSS (the interpreter, torch or numpy, gRPC) is not a copy of the model.

    .venv/bin/python hack/bench_whole_round.py --flower-python .venv-bench/bin/python \\
        [--sizes 25,100] [--rounds 3] [--plaintext] [--quick] [--keep]

Exits 1, with the failing side's log tails, when a side fails; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fedkube.tasks.base import ClientContext, EvalResult, TrainResult

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "hack" / "flower_bench_app"
CLIENTS = 4
LAYERS = 4
CONSTANT = 0.001
"""What a client adds to every weight instead of training."""
NUM_EXAMPLES = 10
"""Every client's example count (its FedAvg weight)."""
POLL_SECONDS = 0.1
STOP_GRACE_SECONDS = 5.0
FLOWER_CONNECTION = "bench"
"""The SuperLink connection's name in the Flower configuration the benchmark writes."""


# ---- the fedkube task (the aggregator and the clients import this module for it) -----------

class NoTrainingTask:
    """``LAYERS`` wide ``Linear`` layers; training adds a constant, nothing is evaluated.

    ``spec.task.config``: ``width`` (each layer is ``width x width`` plus a bias), ``layers``.
    """

    def model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        torch.manual_seed(int(config.get("seed", 0)))
        width = int(config["width"])
        return torch.nn.Sequential(*(torch.nn.Linear(width, width)
                                     for _ in range(int(config["layers"]))))

    def client_data(self, client: ClientContext, config: Mapping[str, Any]) -> None:
        return None

    def train(self, model: torch.nn.Module, data: Any, config: Mapping[str, Any], *,
              device: torch.device, proximal_mu: float = 0.0) -> TrainResult:
        """No training: the received weights plus a constant, in place."""
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(CONSTANT)
        return TrainResult(num_examples=NUM_EXAMPLES, metrics={})

    def evaluate(self, model: torch.nn.Module, config: Mapping[str, Any], *,
                 device: torch.device) -> EvalResult | None:
        """No central test set (and no federated evaluation: the task has no validate)."""
        return None


task = NoTrainingTask()


# ---- model sizes -------------------------------------------------------------------------

def layer_width(parameters: float) -> int:
    """The width whose ``LAYERS`` layers hold about ``parameters`` values."""
    return round(math.sqrt(parameters / LAYERS))


def parameter_count(width: int) -> int:
    return LAYERS * (width * width + width)


# ---- results -------------------------------------------------------------------------------

@dataclass
class Measurement:
    """One side's run at one model size."""

    round_seconds: list[float]
    peak_rss: int
    """Server side's peak RSS, bytes."""
    idle_rss: int
    """Server side's RSS before round 1, bytes."""
    cpu_seconds: float
    """Server side's user + system CPU time over its whole life."""
    wall_seconds: float
    wall_what: str
    """What :attr:`wall_seconds` spans."""
    notes: list[str] = field(default_factory=list)

    @property
    def per_round(self) -> float:
        """Mean of rounds 2..N: round 1 also includes the clients' start-up."""
        later = self.round_seconds[1:] or self.round_seconds
        return statistics.fmean(later)

    def copies(self, model_bytes: int) -> float:
        """Models held at the peak: the idle process's global model and what the rounds
        added."""
        return 1 + (self.peak_rss - self.idle_rss) / model_bytes


class SideFailed(Exception):
    """A side did not complete its rounds; the message ends with its log tails."""


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"--- {path.name}: (no log)"
    return f"--- {path.name} (last {lines} lines):\n" + "\n".join(text.splitlines()[-lines:])


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             check: Callable[[], None] = lambda: None) -> None:
    """Poll ``condition`` until it holds; ``check`` raises when waiting is pointless."""
    deadline = time.monotonic() + timeout
    while not condition():
        check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_SECONDS)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start(command: list[str], log: Path, env: Mapping[str, str],
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """``command`` in a session of its own, logging to ``log``."""
    with log.open("ab") as stream:
        return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True)


# ---- processes seen through /proc ------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class ProcInfo(NamedTuple):
    """What ``/proc/PID/stat`` says of one process."""

    ppid: int
    start: int
    """Start time in clock ticks after boot: with the pid, the process's identity."""
    comm: str
    state: str
    cpu_ticks: int
    """User + system time of the process itself (a zombie keeps its final value)."""
    rss_pages: int


def proc_table() -> dict[int, ProcInfo]:
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        close = text.rindex(")")
        fields = text[close + 2:].split()
        table[int(entry.name)] = ProcInfo(
            ppid=int(fields[1]), start=int(fields[19]), comm=text[text.index("(") + 1:close],
            state=fields[0], cpu_ticks=int(fields[11]) + int(fields[12]),
            rss_pages=int(fields[21]))
    return table


Identity = tuple[int, int]
"""A process: its pid and start time."""


def descendants(table: Mapping[int, ProcInfo], roots: Iterable[int]) -> set[Identity]:
    """The processes under ``roots``, the roots included."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: set[Identity] = set()
    stack = [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        found.add((pid, table[pid].start))
        stack.extend(children.get(pid, []))
    return found


def peak_rss_of(pid: int) -> int:
    """The process's own RSS high-water mark (VmHWM), bytes; 0 once it has exited."""
    with suppress(OSError, StopIteration):
        with open(f"/proc/{pid}/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return 0


@dataclass
class Seen:
    """One process of a sampled tree, as last seen."""

    comm: str
    cpu_seconds: float = 0.0
    peak_rss: int = 0
    running: bool = True


class TreeSampler(threading.Thread):
    """Every ``POLL_SECONDS``, the summed RSS and each one's CPU time of the processes under
    ``root``. A process once seen stays followed (after its parent exits, too)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: dict[Identity, Seen] = {}
        self.samples: list[tuple[float, int]] = []
        """(``time.time()``, summed RSS in bytes)."""
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(POLL_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def sample(self) -> None:
        table = proc_table()
        now = time.time()
        with self._lock:
            alive = descendants(table, [self.root]) | {
                key for key in self.seen if key[0] in table and table[key[0]].start == key[1]}
            total = 0
            for pid, start_ in alive:
                info = table[pid]
                seen = self.seen.setdefault((pid, start_), Seen(info.comm))
                seen.cpu_seconds = info.cpu_ticks / CLOCK_TICKS
                seen.running = info.state != "Z"
                if seen.running:
                    rss = info.rss_pages * PAGE_BYTES
                    total += rss
                    seen.peak_rss = max(seen.peak_rss, rss, peak_rss_of(pid))
            for key in self.seen.keys() - alive:
                self.seen[key].running = False  # reaped
            self.samples.append((now, total))

    def processes(self, comm: str) -> list[Seen]:
        with self._lock:
            return [Seen(**vars(seen)) for seen in self.seen.values() if seen.comm == comm]

    def identities(self) -> set[Identity]:
        with self._lock:
            return set(self.seen)


def stop_all(roots: list[subprocess.Popen[bytes]], others: set[Identity]) -> None:
    """SIGTERM each root's session and every other process, SIGKILL what is left after
    ``STOP_GRACE_SECONDS``. Each of ``others`` is signalled only while it is still the
    process that was seen (same pid and start time) and not a zombie."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in roots:
            if process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
        table = proc_table()
        for pid, start_ in others:
            info = table.get(pid)
            if info is not None and info.start == start_ and info.state != "Z":
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in roots:
            with suppress(subprocess.TimeoutExpired):
                process.wait(max(deadline - time.monotonic(), 0.01))


# ---- fedkube -------------------------------------------------------------------------------

class Usage(NamedTuple):
    """What the kernel accounted to a process over its whole life."""

    exit_code: int
    peak_rss: int
    cpu_seconds: float


def try_reap(process: subprocess.Popen[bytes]) -> Usage | None:
    """The process's usage if it has exited (``wait4``: its peak RSS survives its exit)."""
    pid, wait_status, usage = os.wait4(process.pid, os.WNOHANG)
    if not pid:
        return None
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    return Usage(process.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def run_fedkube(width: int, rounds: int, folder: Path, timeout: float,
                tls: bool) -> Measurement:
    """The aggregator and 4 clients as processes, over mutual TLS unless not ``tls``; see the
    module docstring."""
    # The harness's imports, here: the aggregator and the clients import this module too.
    import yaml
    from runtime_support import ENV, make_config

    from fedkube.api.runtime import RuntimeConfig
    from fedkube.local import client_tls_dir

    folder.mkdir(parents=True)
    config = make_config(folder, rounds=rounds, clients=CLIENTS, min_clients=CLIENTS,
                         timeout=600, task_config={"width": width, "layers": LAYERS},
                         tls=tls)
    data = yaml.safe_load(config.read_text())
    data["spec"]["task"]["entrypoint"] = f"{Path(__file__).stem}:task"
    data["spec"]["aggregator"]["checkpoint"]["everyRounds"] = rounds
    runtime = RuntimeConfig.model_validate(data)
    config.write_text(runtime.to_yaml())
    env = ENV | {"PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT / "hack"), ENV.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "fedkube.cli"]
    logs = {name: folder / f"{name}.log"
            for name in ["aggregator", *(f"client-{i}" for i in range(CLIENTS))]}

    def failed(reason: str) -> SideFailed:
        return SideFailed("fedkube: " + reason + "\n" +
                          "\n".join(tail(log) for log in logs.values()))

    started = time.monotonic()
    aggregator = start([*command, "aggregator", "--config", str(config)],
                       logs["aggregator"], env)
    clients: list[subprocess.Popen[bytes]] = []
    usage: Usage | None = None
    try:
        def check() -> None:
            nonlocal usage
            usage = usage or try_reap(aggregator)
            if usage is not None and usage.exit_code != 0:
                raise failed(f"the aggregator exited with {usage.exit_code}")
            for index, client in enumerate(clients):
                if client.poll():
                    raise failed(f"client {index} exited with {client.returncode}")

        def answers_status() -> bool:
            url = f"http://127.0.0.1:{runtime.spec.aggregator.metrics_port}/status"
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(answers_status, 120, "the aggregator's /status", check)
        idle_rss = rss_of(aggregator.pid)
        tls_args = ["--tls-dir", str(client_tls_dir(folder / "tls", None))] if tls else []
        for index in range(CLIENTS):
            clients.append(start([*command, "client", "--config", str(config), "--index",
                                  str(index), *tls_args], logs[f"client-{index}"], env))
        wait_for(lambda: usage is not None, timeout, "the aggregator to finish", check)
        assert usage is not None
        wall = time.monotonic() - started
        wait_for(lambda: all(c.poll() is not None for c in clients), 60,
                 "the clients to exit", check)
        history = json.loads((folder / "output" / "history.json").read_text())
        if len(history) != rounds or any(r["clients"] != CLIENTS for r in history):
            raise failed(f"history.json does not hold {rounds} rounds of {CLIENTS} updates")
        return Measurement(round_seconds=[r["duration_seconds"] for r in history],
                           peak_rss=usage.peak_rss, idle_rss=idle_rss,
                           cpu_seconds=usage.cpu_seconds, wall_seconds=wall,
                           wall_what="the aggregator's life")
    except (TimeoutError, OSError, ValueError, KeyError) as error:
        raise failed(f"{type(error).__name__}: {error}") from None
    finally:
        stop_all([aggregator, *clients], set())


# ---- Flower --------------------------------------------------------------------------------

FULL_NAMES = {"flower-superlin": "flower-superlink", "flower-superexe": "flower-superexec"}
"""The names that /proc cuts to 15 characters."""


def flower_env(bin_dir: Path, home: Path) -> dict[str, str]:
    """The Flower processes' environment: its virtualenv first on PATH (the SuperLink and
    SuperNodes start ``flower-superexec`` by name), no telemetry, no update checks."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"PATH": os.pathsep.join([str(bin_dir), env.get("PATH", "")]),
                  "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                  "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}


def flwr_json(bin_dir: Path, args: list[str], env: Mapping[str, str], cwd: Path) -> Any:
    """The JSON that ``flwr ARGS --format json`` prints."""
    try:
        done = subprocess.run([str(bin_dir / "flwr"), *args, "--format", "json"], env=env,
                              cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"flwr {' '.join(args)} did not answer in 300s") from None
    start_ = done.stdout.find("{")
    try:
        if done.returncode == 0 and start_ >= 0:
            return json.loads(done.stdout[start_:])
    except ValueError:
        pass
    raise RuntimeError(f"flwr {' '.join(args)} exited with {done.returncode}:\n"
                       f"{done.stdout}{done.stderr}")


def flower_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and the SuperLink's certificate for 127.0.0.1, as Flower's TLS guide lays them
    out (``ca.crt``, ``server.pem``, ``server.key``), issued with fedkube's own PKI code."""
    from datetime import UTC, datetime, timedelta

    from fedkube import pki

    folder.mkdir(parents=True)
    now, valid = datetime.now(UTC), timedelta(days=1)
    ca = pki.issue_ca("bench", "flower", now, valid)
    server = pki.issue_server(ca, "bench", "flower", ["127.0.0.1", "localhost"], now, valid)
    paths = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    for path, content in zip(paths, (ca.cert, server.cert, server.key), strict=True):
        path.write_bytes(content)
    return paths


def run_flower(width: int, rounds: int, folder: Path, bin_dir: Path,
               timeout: float, tls: bool) -> Measurement:
    """SuperLink, 4 SuperNodes and ``flwr run``, over TLS unless not ``tls``; see the module
    docstring."""
    from fedkube.local import free_port

    home = folder / "flwr-home"
    home.mkdir(parents=True)
    port, node_ports = free_port(), [free_port() for _ in range(CLIENTS)]
    if tls:
        ca, cert, key = flower_certificates(folder / "certificates")
        link_security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                         "--ssl-keyfile", str(key)]
        node_security = ["--root-certificates", str(ca)]
        cli_security = f'root-certificates = "{ca}"\n'
    else:
        link_security, node_security, cli_security = ["--insecure"], ["--insecure"], \
            "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FLOWER_CONNECTION}"\n\n[superlink.{FLOWER_CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\n{cli_security}')
    env = flower_env(bin_dir, home)
    timings = folder / "rounds.json"
    logs = [folder / "superlink.log", *(folder / f"supernode-{i}.log" for i in range(CLIENTS))]
    run_id: int | None = None

    def failed(reason: str) -> SideFailed:
        tails = [tail(log) for log in logs]
        if run_id is not None:
            with suppress(Exception):
                shown = subprocess.run(
                    [str(bin_dir / "flwr"), "log", str(run_id), FLOWER_CONNECTION, "--show"],
                    env=env, cwd=folder, capture_output=True, text=True, timeout=60)
                lines = (shown.stdout + shown.stderr).splitlines()[-40:]
                tails.append("--- flwr log (the ServerApp's):\n" + "\n".join(lines))
        return SideFailed("Flower: " + reason + "\n" + "\n".join(tails))

    superlink = start([str(bin_dir / "flower-superlink"), *link_security, "--port", str(port),
                       "--disable-runtime-dependency-installation"], logs[0], env, cwd=folder)
    sampler = TreeSampler(superlink.pid)
    supernodes: list[subprocess.Popen[bytes]] = []
    try:
        def check() -> None:
            for name, process in [("the SuperLink", superlink),
                                  *((f"SuperNode {i}", p) for i, p in enumerate(supernodes))]:
                if process.poll() is not None:
                    raise failed(f"{name} exited with {process.returncode}")

        wait_for(lambda: port_open(port), 120, "the SuperLink's port", check)
        sampler.start()
        for index, node_port in enumerate(node_ports):
            supernodes.append(start(
                [str(bin_dir / "flower-supernode"), *node_security, "--superlink",
                 f"127.0.0.1:{port}", "--port", str(node_port), "--node-config",
                 f"partition-id={index} num-partitions={CLIENTS}"],
                logs[1 + index], env, cwd=folder))
        submitted = time.time()
        overrides = (f'width={width} layers={LAYERS} num-server-rounds={rounds} '
                     f'num-clients={CLIENTS} timings="{timings}"')
        run_id = int(flwr_json(bin_dir, ["run", str(APP_DIR), FLOWER_CONNECTION,
                                         "--run-config", overrides], env, folder)["run-id"])

        def recorded() -> list[dict[str, float]]:
            try:
                entries: list[dict[str, float]] = json.loads(timings.read_text())
            except (OSError, ValueError):
                return []
            return entries

        def finished() -> bool:
            apps = sampler.processes("flwr-serverapp")
            done = bool(apps) and not any(app.running for app in apps)
            if done and len(recorded()) < rounds:
                raise failed(f"the ServerApp exited after {len(recorded())} of {rounds} "
                             "rounds")
            return done

        wait_for(finished, timeout, "the run to finish", check)
        wall = time.time() - submitted
        sampler.stop()
        runs = flwr_json(bin_dir, ["ls", FLOWER_CONNECTION, "--run-id", str(run_id)], env,
                         folder)["runs"]
        if runs[0]["status"] != "finished:completed":
            raise failed(f"run {run_id} is {runs[0]['status']}")
        entries = recorded()
        first_round = entries[0]["start"]
        before = [total for moment, total in sampler.samples if moment < first_round]
        peaks: dict[str, int] = {}
        for seen in sampler.seen.values():
            peaks[seen.comm] = max(peaks.get(seen.comm, 0), seen.peak_rss)
        return Measurement(
            round_seconds=[entry["end"] - entry["start"] for entry in entries],
            peak_rss=max(total for _, total in sampler.samples),
            idle_rss=before[-1] if before else sampler.samples[0][1],
            cpu_seconds=sum(seen.cpu_seconds for seen in sampler.seen.values()),
            wall_seconds=wall, wall_what="flwr run to the ServerApp's exit",
            notes=["per-process peaks (VmHWM): " + ", ".join(
                f"{FULL_NAMES.get(comm, comm)} {peak / 2**20:.0f} MiB"
                for comm, peak in peaks.items() if peak >= 2**20)])
    except (TimeoutError, RuntimeError, OSError, ValueError, KeyError) as error:
        raise failed(f"{type(error).__name__}: {error}") from None
    finally:
        if sampler.is_alive():
            sampler.stop()
        table = proc_table()
        stop_all([*supernodes, superlink], sampler.identities() | descendants(
            table, [p.pid for p in (superlink, *supernodes) if p.poll() is None]))


# ---- the report ----------------------------------------------------------------------------

def mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


Row = tuple[str, int, Measurement, Measurement]
"""Size label, parameters, fedkube's and Flower's measurements."""


def print_table(rows: list[Row]) -> None:
    print(f"{'':16}|{'seconds per round':^28}|{'server peak RSS, MiB (copies)':^31}|"
          f"{'server CPU s':^17}")
    print(f"{'size':>6} {'params':>8} |{'fedkube':>9}{'Flower':>9}{'Fl/fk':>9} |"
          f"{'fedkube':>14}{'Flower':>16} |{'fedkube':>8}{'Flower':>8}")
    for label, params, fedkube, flower in rows:

        def rss(side: Measurement, model: int = params * 4) -> str:
            return f"{mib(side.peak_rss)} ({side.copies(model):.2f})"

        print(f"{label:>6} {params / 1e6:>7.1f}M |{fedkube.per_round:>9.2f}"
              f"{flower.per_round:>9.2f}{flower.per_round / fedkube.per_round:>8.1f}x |"
              f"{rss(fedkube):>14}{rss(flower):>16} |"
              f"{fedkube.cpu_seconds:>8.1f}{flower.cpu_seconds:>8.1f}")


def print_targets(rows: list[Row]) -> None:
    """The issue's targets at 100M parameters: >= 10x faster, <= 4 model copies."""
    for label, params, fedkube, flower in rows:
        if label != "100M":
            continue
        ratio, copies = flower.per_round / fedkube.per_round, fedkube.copies(params * 4)
        print(f"target at 100M: Flower/fedkube {ratio:.1f}x (>= 10x: "
              f"{'met' if ratio >= 10 else 'NOT met'}); aggregator peak {copies:.2f} model "
              f"copies (<= 4: {'met' if copies <= 4 else 'NOT met'}); its whole peak RSS is "
              f"{fedkube.peak_rss / (params * 4):.2f} models' bytes")


def print_details(label: str, name: str, result: Measurement) -> None:
    rounds = ", ".join(f"{seconds:.2f}" for seconds in result.round_seconds)
    print(f"  {label} {name}: rounds [{rounds}] s; wall {result.wall_seconds:.1f} s "
          f"({result.wall_what}); "
          f"idle RSS {mib(result.idle_rss)} MiB, peak {mib(result.peak_rss)} MiB"
          + "".join(f"; {note}" for note in result.notes))


def parse_sizes(text: str) -> list[float]:
    try:
        sizes = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 25,100") from None
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError("give one or more positive sizes, e.g. 25,100")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flower-python", type=Path, default=ROOT / ".venv-bench/bin/python",
                        help="python of the virtualenv with Flower (its bin/ has "
                             "flower-superlink, flower-supernode and flwr)")
    parser.add_argument("--sizes", type=parse_sizes, default=[25.0, 100.0],
                        help="model sizes in millions of parameters (default: 25,100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size (default: 3)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds each side may take per size (default: 1800)")
    parser.add_argument("--plaintext", action="store_true",
                        help="run both sides without TLS (fedkube's security.tls.mode "
                             "Disabled, Flower's --insecure)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: one 2M-parameter model, 1 round")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (configs, logs, round times) and say where")
    args = parser.parse_args()
    sizes, rounds = ([2.0], 1) if args.quick else (args.sizes, args.rounds)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    bin_dir = args.flower_python.absolute().parent
    if not (bin_dir / "flower-superlink").exists():
        parser.error(f"{bin_dir} has no flower-superlink: point --flower-python at the "
                     "python of a virtualenv with Flower")
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    flower_version = subprocess.run(
        [str(args.flower_python), "-c", "import flwr; print(flwr.__version__)"],
        capture_output=True, text=True, check=True).stdout.strip()
    print(f"FedAvg whole rounds, {CLIENTS} clients, no training, {rounds} round(s) per size; "
          f"fedkube (torch {torch.__version__}, "
          f"{'plaintext' if args.plaintext else 'mutual TLS'}) vs Flower {flower_version} "
          f"deployment engine ({'plain HTTP' if args.plaintext else 'HTTPS'} on localhost)")
    print(f"{os.cpu_count()} CPUs; load average before: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = []
    prefix = "fedkube-whole-round-"
    with (nullcontext(tempfile.mkdtemp(prefix=prefix)) if args.keep
          else tempfile.TemporaryDirectory(prefix=prefix)) as tmp:
        if args.keep:
            print(f"work folder (kept): {tmp}")
        for size in sizes:
            width = layer_width(size * 1e6)
            label = f"{size:g}M"
            try:
                fedkube = run_fedkube(width, rounds, Path(tmp) / f"fedkube-{label}",
                                      args.timeout, tls=not args.plaintext)
                print_details(label, "fedkube", fedkube)
                flower = run_flower(width, rounds, Path(tmp) / f"flower-{label}", bin_dir,
                                    args.timeout, tls=not args.plaintext)
                print_details(label, "Flower ", flower)
            except SideFailed as error:
                print(error, file=sys.stderr)
                return 1
            rows.append((label, parameter_count(width), fedkube, flower))
    print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"\ns/round: mean of rounds 2..{rounds} (round 1 includes the clients' start-up)"
          if rounds > 1 else "\ns/round: the one round (it includes the clients' start-up)")
    print("server side: fedkube's aggregator; Flower's SuperLink + SuperExec + flwr-serverapp;"
          " copies: 1 + (peak - idle RSS) / model bytes")
    print_table(rows)
    print_targets(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
