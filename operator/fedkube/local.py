"""``fedkube run``: one FederatedJob on this machine, as an aggregator and N client processes.

The processes speak the same gRPC protocol over 127.0.0.1 as pods do in a cluster, read the
same RuntimeConfig, and use mutual TLS with throwaway certificates made for this run (a CA,
the aggregator's and one per site, in the run folder's ``tls/``). Each child
runs in its own process group so that Ctrl-C (or SIGTERM) here stops all of them and leaves
no orphans behind, whatever they were doing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, closing, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from fedkube import pki
from fedkube.api import FederatedJob, JobMetrics
from fedkube.api.runtime import AggregatorReport, RuntimeConfig, last_line
from fedkube.api.validation import InvalidJobError, load_jobs
from fedkube.controller.builders import identities
from fedkube.federation.runtime import THREADS_ENV
from fedkube.federation.security import TlsFiles

console = Console(stderr=True, highlight=False)

#: Seconds the clients get to exit on their own after the aggregator finished.
CLIENT_EXIT_GRACE = 15.0
#: Seconds between SIGTERM and SIGKILL when stopping a process group.
STOP_GRACE = 5.0


class UnusableOptions(ValueError):
    """Command-line options that cannot work with this job; each problem names the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def override(job: FederatedJob, rounds: int | None, clients: int | None,
             metrics_port: int | None) -> FederatedJob:
    """The job with the command line's overrides and free local ports."""
    data = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec = data["spec"]
    if rounds is not None:
        spec["rounds"] = rounds
    if clients is not None:
        spec["clients"]["replicas"] = clients
        spec["strategy"]["minClients"] = min(spec["strategy"]["minClients"], clients)
    port = free_port()
    spec["aggregator"]["port"] = port
    spec["aggregator"]["metricsPort"] = metrics_port or free_port()
    while spec["aggregator"]["metricsPort"] == port:
        spec["aggregator"]["metricsPort"] = free_port()
    return FederatedJob.model_validate(data)


#: Validity of a run's throwaway certificates.
RUN_CERTIFICATE_DAYS = 7


def write_certificates(job: FederatedJob, folder: Path) -> pki.KeyPair:
    """A fresh CA for this run, the aggregator's certificate for 127.0.0.1 and one client
    certificate per site (or one for all clients of a job without sites), in ``folder``:
    ``aggregator/``, ``sites/<site>/`` or ``clients/``, each with ca.crt, tls.crt, tls.key.
    Returns the CA, which is not written anywhere: nothing else is signed with it."""
    shutil.rmtree(folder, ignore_errors=True)
    namespace, name = job.namespace, job.metadata.name
    now, valid = datetime.now(UTC), timedelta(days=RUN_CERTIFICATE_DAYS)
    ca = pki.issue_ca(namespace, name, now, valid)
    server = pki.issue_server(ca, namespace, name, ["127.0.0.1", "localhost"], now, valid)
    TlsFiles(ca.cert, server.cert, server.key).write(folder / "aggregator")
    for site in identities(job):
        identity = pki.Identity(namespace, name, site)
        pair = pki.issue_client(ca, identity, now, valid)
        TlsFiles(ca.cert, pair.cert, pair.key).write(client_tls_dir(folder, identity.site))
    return ca


def client_tls_dir(tls_folder: Path, site: str | None) -> Path:
    return tls_folder / ("sites/" + site if site is not None else pki.CLIENTS)


def prepare_run_folder(job: FederatedJob, folder: Path, *, resume: bool = False) -> Path:
    """Certificates, RuntimeConfig and a fresh log folder. Old checkpoints are removed unless
    ``resume``: then the aggregator continues after the last checkpointed round."""
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    shutil.rmtree(folder / "logs", ignore_errors=True)
    (folder / "logs").mkdir()
    tls = job.spec.security.tls.mode != "Disabled"
    if tls:
        write_certificates(job, folder / "tls")
    config = RuntimeConfig(
        job_name=job.metadata.name, namespace=job.namespace,
        spec=job.spec, aggregator_address=f"127.0.0.1:{job.spec.aggregator.port}",
        bind_address="127.0.0.1",
        tls_dir=str((folder / "tls" / "aggregator").resolve()),
        checkpoint_dir=str((folder / "checkpoints").resolve()),
        output_dir=str(folder.resolve()))
    path = folder / "config.yaml"
    path.write_text(config.to_yaml())
    return path


#: Environment of every child on top of ours: one compute thread each, so that N processes
#: share the cores instead of oversubscribing them, and logs that are not block-buffered.
CHILD_ENV = {THREADS_ENV: "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "PYTHONUNBUFFERED": "1"}


class ProcessGroup:
    """``fedkube`` children, each in its own session; :meth:`stop` ends every one of them.

    Each child logs to ``log_dir/NAME.log``; a name started again (a restarted process)
    appends to its log, so nothing the first one wrote is lost.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self._names: dict[int, str] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedkube.cli", *args], stdout=log,
                stderr=subprocess.STDOUT, env=os.environ | CHILD_ENV, start_new_session=True)
        self.processes.append(process)
        self._names[process.pid] = name
        return process

    def first_failure(self) -> tuple[str, int] | None:
        """Name and exit code of the first process (in start order) that exited non-zero."""
        for process in self.processes:
            if process.poll():
                return self._names[process.pid], process.returncode
        return None

    def last_log_line(self, name: str) -> str:
        return last_line((self.log_dir / f"{name}.log").read_text(errors="replace")) or \
            "(no output)"

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.processes:
            with suppress(subprocess.TimeoutExpired):
                process.wait(max(deadline - time.monotonic(), 0.01))

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM each group, then SIGKILL what is left after ``grace`` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in self.processes if p.poll() is None]
            for process in alive:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
            deadline = time.monotonic() + grace
            for process in alive:
                with suppress(subprocess.TimeoutExpired):
                    process.wait(max(deadline - time.monotonic(), 0.01))


def fetch(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        return json.loads(response.read())


def progress_table(name: str, report: AggregatorReport | None,
                   history: list[dict[str, Any]], started: float) -> Table:
    table = Table(title=f"fedkube run {escape(name)}", title_justify="left")
    for column in ("phase", "round", "clients", "loss", "accuracy", "s/round", "elapsed"):
        table.add_column(column, justify="right")
    last = history[-1] if history else {}
    if report is None:
        table.add_row("Starting", "-", "-", "-", "-", "-", f"{time.monotonic() - started:.0f}s")
        return table
    table.add_row(
        report.phase, f"{report.round}/{report.rounds}", str(report.clients_connected),
        _format(report.metrics.loss), _format(report.metrics.accuracy),
        f"{last['duration_seconds']:.2f}" if last else "-",
        f"{time.monotonic() - started:.0f}s")
    return table


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy of the global model per round, as a PNG (gaps where a task has no
    central evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [entry["round"] for entry in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    def values(key: str) -> list[float]:
        return [float("nan") if entry[key] is None else entry[key] for entry in history]

    loss_axis.plot(rounds, values("loss"), marker="o")
    loss_axis.set(title="global loss", xlabel="round", ylabel="loss")
    accuracy_axis.plot(rounds, values("accuracy"), marker="o", color="tab:green")
    accuracy_axis.set(title="global accuracy", xlabel="round", ylabel="accuracy", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _follow(job: FederatedJob, group: ProcessGroup, aggregator: subprocess.Popen[bytes],
            history_file: Path) -> None:
    """Show progress until the aggregator exits or any process fails.

    No one recreates a failed client here (the operator would), and the aggregator would
    wait for it, so a failed client ends the run.
    """
    port = job.spec.aggregator.metrics_port
    started = time.monotonic()
    report, history = None, []
    with Live(progress_table(job.metadata.name, None, [], started), console=console,
              refresh_per_second=4) as live:
        while aggregator.poll() is None and group.first_failure() is None:
            try:
                report = AggregatorReport.model_validate(fetch(port, "/status"))
                history = fetch(port, "/history")
            except OSError:
                pass  # not up yet, or just exited
            live.update(progress_table(job.metadata.name, report, history, started))
            time.sleep(0.25)
        if aggregator.returncode == 0 and report is not None and history_file.exists():
            # The last poll may predate the final rounds: end on what the aggregator saved.
            history = json.loads(history_file.read_text())
            last = history[-1]
            report = report.model_copy(update={
                "phase": "Succeeded", "round": last["round"],
                "metrics": JobMetrics(loss=last["loss"], accuracy=last["accuracy"]),
            })
            live.update(progress_table(job.metadata.name, report, history, started))
    if not console.is_terminal:
        console.line()  # off a terminal, Live leaves its last frame without a newline


def run_local(job_file: Path, *, rounds: int | None = None, clients: int | None = None,
              output: Path | None = None, metrics_port: int | None = None,
              resume: bool = False, data: dict[str, Path] | None = None) -> int:
    """Run the first FederatedJob of ``job_file``; the exit code (130 on Ctrl-C).

    With ``resume``, continue from the run folder's last checkpoint (e.g. after Ctrl-C).
    ``data`` gives sites' data directories (``--data SITE=DIR``).
    """
    try:
        jobs = load_jobs(job_file)
        if jobs[0].spec.remote is not None:
            raise UnusableOptions([f"{job_file} is a client-only job (spec.remote): its "
                                   "aggregator runs elsewhere. Join it from here with "
                                   "`fedkube client --bundle FILE --data DIR`"])
        if clients is not None and jobs[0].spec.sites:
            raise UnusableOptions([f"--clients sets clients.replicas, which a job with sites "
                                   f"does not use: change sites[].replicas in {job_file}"])
        data_dirs = site_data_dirs(jobs[0], data or {})
    except (InvalidJobError, UnusableOptions) as error:
        for problem in error.problems:
            console.print(f"[red]✗[/red] {escape(str(problem))}", soft_wrap=True)
        return 1
    if len(jobs) > 1:
        console.print(f"[yellow]{job_file} holds {len(jobs)} FederatedJobs: running the first, "
                      f"{escape(jobs[0].metadata.name)}[/yellow]")
    job = override(jobs[0], rounds, clients, metrics_port)
    folder = output or Path("runs") / job.metadata.name
    config = prepare_run_folder(job, folder, resume=resume)
    group = ProcessGroup(folder / "logs")
    # SIGTERM stops the run as Ctrl-C does, so that a supervisor never orphans the children.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    with ExitStack() as cleanup:
        cleanup.callback(signal.signal, signal.SIGTERM, previous)
        cleanup.callback(group.stop)
        try:
            aggregator = group.start("aggregator", "aggregator", "--config", str(config))
            for slot in job.spec.client_slots():
                site = slot.site
                name = f"client-{slot.index}" if site is None else \
                    f"{site.name}-{slot.site_index}"
                data_dir = [] if site is None else ["--data-dir", str(data_dirs[site.name])]
                tls = [] if job.spec.security.tls.mode == "Disabled" else [
                    "--tls-dir", str(client_tls_dir(folder / "tls",
                                                    site.name if site else None))]
                group.start(name, "client", "--config", str(config), "--index", str(slot.index),
                            *data_dir, *tls)
            _follow(job, group, aggregator, folder / "history.json")
            failure = group.first_failure()
            if failure is None:  # told the job is over, the clients exit on their own
                group.wait_all(CLIENT_EXIT_GRACE)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping the aggregator and the clients[/yellow]")
            return 130
    if failure is not None:
        name, code = failure
        console.print(f"[red]✗[/red] the {name} process exited with {code}: "
                      f"{escape(group.last_log_line(name))}\n  logs in {folder / 'logs'}",
                      soft_wrap=True)
        return code
    history = json.loads((folder / "history.json").read_text())
    plot_history(history, folder / "history.png")
    last = history[-1]
    console.print(f"[green]✓[/green] {job.metadata.name}: {len(history)} rounds, "
                  f"loss {_format(last['loss'])}, accuracy {_format(last['accuracy'])}; "
                  f"model, history.json and history.png in {folder}")
    return 0


def site_data_dirs(job: FederatedJob, data: dict[str, Path]) -> dict[str, Path]:
    """Each site's data directory on this machine: ``--data SITE=DIR``, else the path of the
    site's hostPath volume. Raises :class:`UnusableOptions` naming each site with neither."""
    unknown = sorted(set(data) - {site.name for site in job.spec.sites})
    problems = [f"--data {name}=...: the job has no site {name!r}" for name in unknown]
    dirs = {}
    for site in job.spec.sites:
        host_path = (site.data.volume.get("hostPath") or {}).get("path")
        chosen = data.get(site.name) or (Path(host_path) if host_path else None)
        if chosen is None:
            problems.append(f"site {site.name!r}: its data volume is not a hostPath: give its "
                            f"directory here with --data {site.name}=DIR")
        elif not chosen.is_dir():
            problems.append(f"site {site.name!r}: data directory {chosen} does not exist")
        else:
            dirs[site.name] = chosen
    if problems:
        raise UnusableOptions(problems)
    return dirs
