"""Who may take part: every refusal, against a live aggregator over real gRPC and TLS.

Each test speaks the protocol by hand as a client that should not get in (no certificate,
another job's CA, an expired certificate, plaintext, a site removed from the job, a site
claiming another's index or session, a replayed or unasked update) and checks that the call is
refused, that the refusal is counted in the aggregator's metrics, and that nothing reached the
aggregate.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from runtime_support import (
    HandmadeClient,
    http_get,
    make_config,
    metric_value,
    processes,
    status,
    wait_for,
)

from fedkube import pki
from fedkube.api import FederatedJob
from fedkube.api.runtime import RuntimeConfig
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.security import TlsFiles, channel_credentials
from fedkube.local import client_tls_dir, write_certificates

SITES = [{"name": name, "replicas": 1, "data": {"volume": {"hostPath": {"path": "/srv"}}}}
         for name in ("north", "south")]
NORTH, SOUTH = 0, 1  # the sites' client indices

@dataclass
class Job:
    """A live aggregator of a two-site job (north, south: one client each); the tests play
    the clients."""

    config: Path
    ca: pki.KeyPair

    def site(self, name: str) -> HandmadeClient:
        """A client with the site's own certificate."""
        return HandmadeClient.of_site(self.config, name)

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(http_get(self.config, "/metrics"), name, job="test", **labels)

    def refusals(self, reason: str) -> float:
        return self.metric("fedkube_refusals_total", reason=reason)

    def folded(self) -> float:
        return self.metric("fedkube_updates_total", status="accepted")


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    config = make_config(tmp_path, rounds=2, min_clients=2, timeout=60, sites=SITES)
    runtime = RuntimeConfig.from_file(config)
    # Certificates made again here to keep the CA, which the tests sign impostors with.
    ca = write_certificates(FederatedJob(metadata={"name": "test", "namespace": "ns"},
                                         spec=runtime.spec), tmp_path / "tls")
    with processes(tmp_path) as group:
        group.aggregator(config)
        wait_for(lambda: http_get(config, "/healthz"), 60, "the aggregator")
        yield Job(config, ca)


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def other_job_credentials(tmp_path: Path) -> grpc.ChannelCredentials:
    """A valid certificate for site north of another job, which has its own CA."""
    other = FederatedJob.model_validate({"metadata": {"name": "other", "namespace": "ns"},
                                         "spec": {"sites": SITES}})
    write_certificates(other, tmp_path / "other")
    return channel_credentials(TlsFiles.read(client_tls_dir(tmp_path / "other", "north")))


def expired_credentials(job: Job) -> grpc.ChannelCredentials:
    """Site north's identity, signed by the job's own CA, expired yesterday."""
    pair = pki.issue_client(job.ca, pki.Identity("ns", "test", "north"),
                            datetime.now(UTC) - timedelta(days=3), timedelta(days=2))
    return grpc.ssl_channel_credentials(job.ca.cert, pair.key, pair.cert)


@pytest.mark.parametrize("case", ["no certificate", "another job's CA", "expired", "plaintext"])
def test_tls_refuses_the_connection_before_any_call(job: Job, tmp_path: Path,
                                                    case: str) -> None:
    credentials = {
        "no certificate": lambda: grpc.ssl_channel_credentials(job.ca.cert),
        "another job's CA": lambda: other_job_credentials(tmp_path),
        "expired": lambda: expired_credentials(job),
        "plaintext": lambda: None,
    }[case]()
    handshakes = job.metric("fedkube_tls_handshakes_total")
    sessions = job.metric("fedkube_tls_sessions_total")
    error = refused(lambda: HandmadeClient(job.config, credentials).join(NORTH))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: job.metric("fedkube_tls_handshakes_total") > handshakes, 10,
             "the refused handshake counted")
    assert job.metric("fedkube_tls_sessions_total") == sessions
    assert status(job.config)["clientsConnected"] == 0


def test_a_site_joins_only_as_its_own_indices(job: Job) -> None:
    north = job.site("north")
    error = refused(lambda: north.join(SOUTH))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "client index 1 is not one of north's" in str(error.details())
    assert refused(lambda: north.join(-1, replica=1)).code() == \
        grpc.StatusCode.PERMISSION_DENIED  # north has one client: replica 1 does not exist
    assert job.refusals("wrong_index") == 2
    assert north.join(-1, replica=0).index == NORTH  # its own, by replica (a bundle client)
    assert job.metric("fedkube_tls_sessions_total") >= 1


def test_a_site_cannot_use_or_replace_another_sites_session(job: Job) -> None:
    south = job.site("south")
    south.join(SOUTH)
    north = job.site("north")
    north.client_id = south.client_id  # stolen, e.g. from a log
    error = refused(lambda: next(north.stub.PullTask(pb.PullTaskRequest(wait_seconds=0),
                                                     metadata=north.metadata)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert job.refusals("wrong_session") == 1
    # South's session is intact: it still gets its tasks.
    stream = south.stub.PullTask(pb.PullTaskRequest(wait_seconds=0), metadata=south.metadata)
    assert next(stream).header.action == pb.TaskHeader.WAIT


def test_replayed_and_unasked_updates_are_refused_and_not_folded(job: Job) -> None:
    north, south = job.site("north"), job.site("south")
    north.join(NORTH)
    south.join(SOUTH)
    round_, state = north.pull()
    assert north.push(round_, state).status == pb.PushUpdateReply.ACCEPTED
    replay = north.push(round_, state)
    assert (replay.status, replay.reason) == (pb.PushUpdateReply.LATE,
                                              "this round already has your answer")
    assert job.refusals("duplicate") == 1
    assert job.folded() == 1
    # South pushes without having pulled its task: it was sent nothing to train.
    unasked = south.push(round_, state)
    assert unasked.reason == "you were not sampled into this round"
    assert job.refusals("not_sampled") == 1
    assert job.folded() == 1
    # The round completes with south's real answer, and the aggregate counts two updates.
    south_round, south_state = south.pull()
    assert south.push(south_round, south_state).status == pb.PushUpdateReply.ACCEPTED
    wait_for(lambda: status(job.config)["round"] == 1, 30, "round 1")
    assert job.folded() == 2


def test_a_site_removed_from_the_job_is_revoked(job: Job) -> None:
    north, south = job.site("north"), job.site("south")
    north.join(NORTH)
    south.join(SOUTH)
    wait_for(lambda: status(job.config)["clientsConnected"] == 2, 10, "both sites")
    runtime = RuntimeConfig.from_file(job.config).model_dump(by_alias=True)
    runtime["spec"]["sites"] = runtime["spec"]["sites"][:1]
    runtime["spec"]["strategy"]["minClients"] = 1
    job.config.write_text(RuntimeConfig.model_validate(runtime).to_yaml())
    # The operator rewrites the ConfigMap in the reconcile that sees the site gone; the
    # aggregator reads the file again within seconds and closes south's session.
    wait_for(lambda: status(job.config)["clientsConnected"] == 1, 15, "south revoked")
    error = refused(lambda: next(south.stub.PullTask(pb.PullTaskRequest(wait_seconds=0),
                                                     metadata=south.metadata)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "south is not a site of this job" in str(error.details())
    assert refused(lambda: south.join(SOUTH)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert job.refusals("revoked") == 2
    assert job.folded() == 0


def test_a_job_that_disables_tls_runs_in_plaintext_and_says_so(tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=1, clients=2, tls=False)
    assert not (tmp_path / "tls").exists()
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        [group.client(config, i) for i in range(2)]
        assert aggregator.wait(120) == 0, group.log("aggregator")
    assert "plaintext gRPC and no client identities (spec.security.tls.mode Disabled)" in \
        group.log("aggregator")
