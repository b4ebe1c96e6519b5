"""Sites on other hosts: the aggregator and each site in its own network namespace, talking
real TCP across veth links, TLS verified against the aggregator's DNS name.

Site north runs as a pod would (the job's configuration and its site's certificate); site
south is outside the cluster and has only its join bundle (``fedkube client --bundle FILE
--data DIR``), which gives it the address, the CA and its certificate, and learns the spec
and its client index from the aggregator.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from runtime_support import ENV, WINE_TASK, write_wine_rows

from fedkube import pki
from fedkube.api import FederatedJobSpec
from fedkube.api.runtime import RuntimeConfig
from fedkube.bundle import Bundle
from fedkube.federation.security import TlsFiles
from tests.netns import NamespacesUnavailable, Network

pytestmark = pytest.mark.timeout(240)
AGGREGATOR_NAME = "aggregator.fedkube.test"
PORT = 50051  # each host has its own network: the default ports are free there


@pytest.fixture
def network() -> Iterator[Network]:
    try:
        with Network({"hub": AGGREGATOR_NAME, "north": "north.fedkube.test",
                      "south": "south.fedkube.test"}) as network:
            yield network
    except NamespacesUnavailable as error:
        pytest.skip(f"network namespaces cannot be created here: {error}")


def fedkube(network: Network, host: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``fedkube ARGS`` on ``host``, logging to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([*network.run_in(host), sys.executable, "-m", "fedkube.cli",
                                 *args], stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)


def write_config(folder: Path, spec: FederatedJobSpec, tls_dir: Path) -> Path:
    """The aggregator's configuration for job fl/wine: clients dial it by name."""
    config = folder / "config.yaml"
    config.write_text(RuntimeConfig(
        job_name="wine", namespace="fl", spec=spec,
        aggregator_address=f"{AGGREGATOR_NAME}:{PORT}", tls_dir=str(tls_dir),
        checkpoint_dir=str(folder / "checkpoints"), output_dir=str(folder / "output"),
    ).to_yaml())
    return config


def digits_job(folder: Path, **spec: Any) -> Path:
    """The configuration of a digits job without sites (``spec`` on top of its defaults) whose
    clients dial the hub by name, with the aggregator's TLS files in ``folder/aggregator`` and
    the clients' in ``folder/client``."""
    now, valid = datetime.now(UTC), timedelta(days=1)
    ca = pki.issue_ca("fl", "wine", now, valid)
    server = pki.issue_server(ca, "fl", "wine", [AGGREGATOR_NAME], now, valid)
    client = pki.issue_client(ca, pki.Identity("fl", "wine"), now, valid)
    TlsFiles(ca.cert, server.cert, server.key).write(folder / "aggregator")
    TlsFiles(ca.cert, client.cert, client.key).write(folder / "client")
    job = FederatedJobSpec.model_validate({"aggregator": {"port": PORT}, **spec})
    return write_config(folder, job, folder / "aggregator")


def job_logs(aggregator: subprocess.Popen[bytes], logs: Path, hosts: tuple[str, ...],
             seconds: float) -> dict[str, str]:
    """The logs of ``hosts`` (``logs/HOST.log``) once the aggregator exited 0 within
    ``seconds``; they are the assertion's message when it did not."""
    try:
        code = aggregator.wait(seconds)
    except subprocess.TimeoutExpired:
        code = None
    log = {host: (logs / f"{host}.log").read_text() for host in hosts}
    assert code == 0, log
    return log


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sites_on_other_hosts_complete_a_job_over_mutual_tls(
        network: Network, tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    for site in ("north", "south"):
        write_wine_rows(tmp_path / site / "rows.csv")
    spec = FederatedJobSpec.model_validate({
        "task": {"entrypoint": "fedkube.tasks.tabular:task", "config": WINE_TASK},
        "rounds": 2, "strategy": {"minClients": 2, "roundTimeoutSeconds": 60},
        "aggregator": {"port": PORT, "service": {"type": "LoadBalancer",
                                                 "externalAddress": AGGREGATOR_NAME}},
        "sites": [{"name": site, "data": {"volume": {"hostPath": {"path": f"/srv/{site}"}}}}
                  for site in ("north", "south")],
    })
    # The job's CA and certificates, as the operator issues them: the server certificate
    # names the aggregator's DNS name only (no IP address).
    now, valid = datetime.now(UTC), timedelta(days=1)
    ca = pki.issue_ca("fl", "wine", now, valid)
    server = pki.issue_server(ca, "fl", "wine", [AGGREGATOR_NAME], now, valid)
    tls = tmp_path / "tls"
    TlsFiles(ca.cert, server.cert, server.key).write(tls / "aggregator")
    site_files = {}
    for site in ("north", "south"):
        pair = pki.issue_client(ca, pki.Identity("fl", "wine", site), now, valid)
        site_files[site] = TlsFiles(ca.cert, pair.cert, pair.key)
    site_files["north"].write(tls / "north")
    config = write_config(tmp_path, spec, tls / "aggregator")
    bundle = tmp_path / "south-bundle.yaml"
    bundle.write_text(yaml.safe_dump(Bundle(f"{AGGREGATOR_NAME}:{PORT}", "fl", "wine",
                                            "south", site_files["south"]).to_secret()))
    logs = tmp_path / "logs"
    logs.mkdir()

    aggregator = fedkube(network, "hub", logs / "aggregator.log",
                         "aggregator", "--config", str(config))
    started.append(aggregator)
    started.append(fedkube(network, "north", logs / "north.log", "client", "--config",
                           str(config), "--index", "0", "--data", str(tmp_path / "north"),
                           "--tls-dir", str(tls / "north")))
    started.append(fedkube(network, "south", logs / "south.log", "client", "--bundle",
                           str(bundle), "--data", str(tmp_path / "south")))

    log = job_logs(aggregator, logs, ("aggregator", "north", "south"), 180)
    history = yaml.safe_load((tmp_path / "output" / "history.json").read_text())
    assert [(entry["round"], entry["clients"]) for entry in history] == [(1, 2), (2, 2)]
    assert history[-1]["federated_evaluation"]["clients"] == 2
    assert "joined (index 0, site north)" in log["aggregator"]
    assert "joined (index 1, site south)" in log["aggregator"]
    assert "mutual TLS" in log["aggregator"]
    # Both sites' updates crossed the links: far more than the model's few hundred bytes
    # times the rounds, in TLS records, arrived at the aggregator's host.
    assert network.received_bytes("hub") > 10_000
    assert network.received_bytes("north") > 10_000 and network.received_bytes("south") > 10_000


def test_tls_is_verified_against_the_name_the_site_dials(
        network: Network, tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    """The aggregator's certificate names aggregator.fedkube.test, not its IP address: a
    site that dials the address refuses the aggregator, as it would an impostor."""
    config = digits_job(tmp_path, rounds=1)
    started.append(fedkube(network, "hub", tmp_path / "aggregator.log",
                           "aggregator", "--config", str(config)))
    probe = """
import sys, grpc
from fedkube.federation.proto import fedkube_pb2 as pb, fedkube_pb2_grpc as pb_grpc
from fedkube.federation.security import TlsFiles, channel_credentials
credentials = channel_credentials(TlsFiles.read(sys.argv[1]))
for target in sys.argv[2:]:
    channel = grpc.secure_channel(target, credentials)
    try:
        pb_grpc.FederationStub(channel).Join(pb.JoinRequest(index=0), timeout=20,
                                             wait_for_ready=target.startswith("aggregator"))
        print(target, "OK")
    except grpc.RpcError as error:
        print(target, error.code().name, error.details())
"""
    done = subprocess.run([*network.run_in("north"), sys.executable, "-c", probe,
                           str(tmp_path / "client"), f"{AGGREGATOR_NAME}:{PORT}",
                           f"{network.address('hub')}:{PORT}"],
                          capture_output=True, text=True, timeout=60, env=ENV)
    by_name, by_address = done.stdout.splitlines()
    assert by_name == f"{AGGREGATOR_NAME}:{PORT} OK", done.stdout + done.stderr
    assert by_address.startswith(f"{network.address('hub')}:{PORT} UNAVAILABLE"), \
        done.stdout + done.stderr


@pytest.mark.slow
def test_a_site_on_a_slow_link_takes_part_though_its_download_outlasts_a_poll(
        network: Network, tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    """The hub sends at 2 Mbit/s, so a 12.6 MB model takes about 50 s to reach the site:
    longer than the long poll plus the 30 s a client's PullTask once allowed in all, which
    failed such a download every time and the round with it."""
    network.limit_rate("hub", "2mbit")
    config = digits_job(
        tmp_path, task={"entrypoint": "fedkube.tasks.digits:task", "config": {"hidden": 42_000}},
        rounds=1, clients={"replicas": 1},
        strategy={"minClients": 1, "roundTimeoutSeconds": 200})
    logs = tmp_path / "logs"
    logs.mkdir()
    started.append(aggregator := fedkube(network, "hub", logs / "aggregator.log",
                                         "aggregator", "--config", str(config)))
    started.append(fedkube(network, "north", logs / "north.log", "client", "--config",
                           str(config), "--index", "0", "--tls-dir", str(tmp_path / "client")))

    log = job_logs(aggregator, logs, ("aggregator", "north"), 220)
    history = yaml.safe_load((tmp_path / "output" / "history.json").read_text())
    assert [(entry["round"], entry["clients"]) for entry in history] == [(1, 1)]
    assert "lost the aggregator" not in log["north"], log["north"]
    # The premise: the link was that slow, the model crossed it once.
    assert history[0]["duration_seconds"] > 45, history
    assert 12_600_000 < network.received_bytes("north") < 2 * 12_600_000


#: Links of the chaos below: slow enough that a round spends most of its time moving models,
#: where the cuts mean the most.
CHAOS_RATE = "8mbit"
CHAOS_SITES = ("north", "south")


def _job_with_cuts(network: Network, folder: Path, started: list[subprocess.Popen[bytes]],
                   rounds: int, cuts: int, seed: int = 0,
                   ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, str], int]:
    """A job of one client on each of :data:`CHAOS_SITES` whose TCP connections to the hub are
    cut (``ss -K``: both ends see the connection reset) ``cuts`` times, at random moments
    0.3-1.5 s apart, then left alone; its model, history, logs and the cuts made (fewer when
    the job ended first)."""
    config = digits_job(
        folder, task={"entrypoint": "fedkube.tasks.digits:task",
                      "config": {"hidden": 2000, "lr": 0.1}},
        rounds=rounds, clients={"replicas": len(CHAOS_SITES)},
        # Every round needs both clients: an update lost to a cut must come again.
        strategy={"minClients": len(CHAOS_SITES), "roundTimeoutSeconds": 60})
    logs = folder / "logs"
    logs.mkdir()
    started.append(aggregator := fedkube(network, "hub", logs / "aggregator.log",
                                         "aggregator", "--config", str(config)))
    for index, site in enumerate(CHAOS_SITES):
        started.append(fedkube(network, site, logs / f"{site}.log", "client", "--config",
                               str(config), "--index", str(index),
                               "--tls-dir", str(folder / "client")))
    rng = random.Random(seed)
    made = 0
    while made < cuts and aggregator.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            aggregator.wait(rng.uniform(0.3, 1.5))
        subprocess.run([*network.run_in(rng.choice(CHAOS_SITES)), "ss", "-K", "dst",
                        network.address("hub")], capture_output=True, check=True)
        made += 1
    log = job_logs(aggregator, logs, ("aggregator", *CHAOS_SITES), 300)
    model = torch.load(folder / "output" / "model.pt", weights_only=True)
    history = json.loads((folder / "output" / "history.json").read_text())
    return model, history, log, made


@pytest.mark.parametrize(("rounds", "cuts"), [
    (6, 20), pytest.param(16, 80, marks=[pytest.mark.slow, pytest.mark.timeout(900)])])
def test_connections_cut_at_random_leave_the_model_of_an_uninterrupted_run(
        network: Network, tmp_path: Path, started: list[subprocess.Popen[bytes]],
        rounds: int, cuts: int) -> None:
    """Cuts land in downloads, uploads and long polls: a client whose transfer broke off
    asks again and is sent the round again, so every round still folds every client's
    update, and the job ends bit for bit where a calm run ends."""
    for host in ("hub", *CHAOS_SITES):
        network.limit_rate(host, CHAOS_RATE)
    expected, expected_history, _, _ = _job_with_cuts(network, tmp_path / "calm", started,
                                                      rounds, cuts=0)
    model, history, log, made = _job_with_cuts(network, tmp_path / "cut", started, rounds,
                                               cuts, seed=rounds * 1009)
    resent = log["aggregator"].count("sending the model again")
    retries = sum(log[site].count("lost the aggregator") for site in CHAOS_SITES)
    print(f"network chaos: {made} cuts, {retries} client retries, {resent} rounds sent again, "
          f"{log['aggregator'].count('broke off')} uploads broke off")
    assert [(entry["round"], entry["clients"]) for entry in history] == [
        (number, len(CHAOS_SITES)) for number in range(1, rounds + 1)]
    assert [entry["loss"] for entry in history] == [e["loss"] for e in expected_history]
    for name, tensor in expected.items():
        assert torch.equal(model[name], tensor), name
    assert resent >= 1, "no cut broke off a transfer: the test proved nothing"
