"""`fedkube run`: a whole job on this machine, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
from runtime_support import ENV, status, wait_for

from fedkube.federation import checkpoint

ROOT = Path(__file__).resolve().parents[2]

JOB = """
apiVersion: fedkube.io/v1alpha1
kind: FederatedJob
metadata: {name: tiny}
spec:
  task: {entrypoint: "fedkube.tasks.digits:task", config: {hidden: 16, lr: 0.1}}
  rounds: 3
  strategy: {name: fedavg, minClients: 2, roundTimeoutSeconds: 30}
  clients: {replicas: 2, data: {partitioning: {scheme: dirichlet, alpha: 0.5, seed: 0}}}
"""


_started: list[subprocess.Popen[str]] = []


def _interruptible() -> None:
    """Ctrl-C as at a terminal: a shell runs background jobs with SIGINT ignored, and a
    process that starts with SIGINT ignored never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fedkube_run(tmp_path: Path, *args: str, job_text: str = JOB) -> subprocess.Popen[str]:
    job = tmp_path / "job.yaml"
    job.write_text(job_text)
    run = subprocess.Popen([sys.executable, "-m", "fedkube.cli", "run", str(job), *args],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=ENV, cwd=tmp_path, start_new_session=True,
                           preexec_fn=_interruptible)
    _started.append(run)
    return run


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """A failed test's ``fedkube run`` and its children are killed, not left to run on."""
    yield
    while _started:
        run = _started.pop()
        with suppress(psutil.NoSuchProcess):
            tree = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
            for process in tree:
                with suppress(psutil.NoSuchProcess):
                    process.kill()
        run.wait()


def test_fedkube_run_writes_model_history_and_plot(tmp_path: Path) -> None:
    run = _fedkube_run(tmp_path, "--rounds", "2", "--clients", "3")
    output, _ = run.communicate(timeout=180)
    assert run.returncode == 0, output
    folder = tmp_path / "runs" / "tiny"
    history = json.loads((folder / "history.json").read_text())
    assert [entry["round"] for entry in history] == [1, 2]
    assert all(entry["clients"] >= 2 for entry in history)  # minClients: 2 of 3
    assert (folder / "model.pt").stat().st_size > 0
    assert (folder / "history.png").read_bytes().startswith(b"\x89PNG")
    assert "accuracy" in output


def _run_readme_task(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    """``fedkube run`` of the README's example task with ``spec.task.config: config``."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n# mytasks/regression.py\n(.*?)```", readme, re.S)
    assert code, "the README's task example is gone"
    (tmp_path / "mytasks").mkdir()
    (tmp_path / "mytasks" / "regression.py").write_text(code.group(1))
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("fedkube.tasks.digits:task", "mytasks.regression:task")
                   .replace("{hidden: 16, lr: 0.1}", config))
    return subprocess.run([sys.executable, "-m", "fedkube.cli", "run", str(job)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=180,
                          check=False, env=ENV | {"PYTHONPATH": str(tmp_path)})


def test_the_readme_task_trains_with_fedkube_run(tmp_path: Path) -> None:
    run = _run_readme_task(tmp_path, "{lr: 0.05}")
    assert run.returncode == 0, run.stderr
    history = json.loads((tmp_path / "runs" / "tiny" / "history.json").read_text())
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"] / 2


def test_a_failed_client_ends_the_run_with_its_reason(tmp_path: Path) -> None:
    # The clients reject the setting after joining; the aggregator would wait for them.
    run = _run_readme_task(tmp_path, "{samplesPerClient: 0}")
    assert run.returncode == 2, run.stderr
    assert re.search(r"the client-\d process exited with 2: .*invalid configuration: "
                     r"spec.task.config.samplesPerClient must be a positive integer", run.stderr)
    _, alive = psutil.wait_procs(_processes_in(tmp_path), timeout=10)
    assert not alive, f"orphans left behind: {alive}"


def test_invalid_job_prints_the_problems_and_exits_1(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("replicas: 2", "replica: 2"))
    run = subprocess.run([sys.executable, "-m", "fedkube.cli", "run", str(job)],
                         capture_output=True, text=True, env=ENV, timeout=60, check=False)
    assert run.returncode == 1
    assert "spec.clients.replica" in run.stderr and "did you mean 'replicas'" in run.stderr


def _processes_in(folder: Path) -> list[psutil.Process]:
    """Processes working in ``folder`` (``fedkube run``'s children inherit its cwd)."""
    found = []
    for process in psutil.process_iter():
        with suppress(psutil.Error):
            if process.cwd() == str(folder):
                found.append(process)
    return found


def test_a_task_that_does_not_import_ends_the_run_with_the_reason(tmp_path: Path) -> None:
    run = _fedkube_run(tmp_path, job_text=JOB.replace("fedkube.tasks.digits", "nosuch.tasks"))
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 2, output
    assert "the aggregator process exited with 2" in output
    assert "invalid configuration: spec.task.entrypoint 'nosuch.tasks:task'" in output
    _, alive = psutil.wait_procs(_processes_in(tmp_path), timeout=10)
    assert not alive, f"orphans left behind: {alive}"


def test_resume_continues_after_the_last_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = _fedkube_run(tmp_path, "--rounds", "100000", "-o", str(out))
    wait_for(lambda: status(out / "config.yaml")["round"] >= 2, 120, "two rounds")
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 130, output
    saved = checkpoint.load(out / "checkpoints")
    assert saved is not None and saved.round >= 2
    resumed = _fedkube_run(tmp_path, "--rounds", str(saved.round + 2), "-o", str(out),
                           "--resume")
    output, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, output
    history = json.loads((out / "history.json").read_text())
    assert [entry["round"] for entry in history] == list(range(1, saved.round + 3))
    assert history[:saved.round] == saved.history
    log = (out / "logs" / "aggregator.log").read_text()
    assert f"resumed from the checkpoint after round {saved.round}" in log


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    run = _fedkube_run(tmp_path, "--rounds", "100000", "-o", str(tmp_path / "out"))
    parent = psutil.Process(run.pid)
    children = wait_for(lambda: len(parent.children()) == 3 and parent.children(), 60,
                        "the aggregator and two clients")
    config = tmp_path / "out" / "config.yaml"
    wait_for(lambda: status(config)["round"] >= 1, 120, "a round to complete")
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 130, output
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans left behind: {alive}"
