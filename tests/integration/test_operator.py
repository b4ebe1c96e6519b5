"""The real kopf operator against the kmock emulator: scenarios as a user sees them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from emulator import (
    Cluster,
    Fault,
    FedkubeEmulator,
    operator_settings,
    running_operator,
    serve_emulator,
    wait_until,
)
from prometheus_client import generate_latest

from fedkube.controller.handlers import Controller
from fedkube.controller.metrics import OperatorMetrics

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = {"rounds": 3, "clients": {"replicas": 3}, "strategy": {"minClients": 2},
                        "aggregator": {"metricsPort": 9090}}


class StatusServer:
    """Stands in for the aggregator's /status: serves whatever report the test sets."""

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        if self.report is None:
            return web.Response(status=503)
        return web.json_response(self.report)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/status"


@pytest.fixture
async def env() -> AsyncIterator[tuple[FedkubeEmulator, Cluster, StatusServer, OperatorMetrics,
                                      str]]:
    status = StatusServer()
    await status.start()
    async with serve_emulator() as (emulator, url), aiohttp.ClientSession() as session:
        yield emulator, Cluster(url, session), status, OperatorMetrics(), url
    assert status.runner is not None
    await status.runner.cleanup()


def phase(job: dict[str, Any] | None) -> str | None:
    return ((job or {}).get("status") or {}).get("phase")


def condition(job: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in job["status"]["conditions"] if c["type"] == type_)


def metric(metrics: OperatorMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return value or 0.0


async def run_pods(cluster: Cluster, job: str, phase_: str = "Running") -> None:
    for name in await cluster.pods(job):
        await cluster.set_pod_status(name, {"phase": phase_})


async def test_job_lifecycle_create_running_rounds_success(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("digits", {**SPEC, "aggregator": {
            "metricsPort": 9090, "checkpoint": {"size": "1Gi"}}})
        pods = await wait_until(lambda: _len_at_least(cluster.pods("digits"), 4),
                                what="aggregator + 3 client pods")
        assert set(pods) == {"digits-aggregator", "digits-client-0", "digits-client-1",
                             "digits-client-2"}
        claims = await cluster.list("persistentvolumeclaims", "digits")
        assert [c["metadata"]["name"] for c in claims] == ["digits-state"]
        assert claims[0]["metadata"]["ownerReferences"][0]["kind"] == "FederatedJob"
        client = pods["digits-client-1"]
        assert client["spec"]["containers"][0]["args"][-2:] == ["--index", "1"]
        assert client["metadata"]["labels"]["fedkube.io/client-index"] == "1"
        owner = client["metadata"]["ownerReferences"][0]
        job = await cluster.job("digits")
        assert owner["uid"] == job["metadata"]["uid"] and owner["controller"] is True
        config = (await cluster.list("configmaps", "digits"))[0]
        assert "digits-aggregator.ml.svc:50051" in config["data"]["config.yaml"]
        secrets = {s["metadata"]["name"]: s for s in await cluster.list("secrets", "digits")}
        assert set(secrets) == {"digits-ca", "digits-aggregator-tls", "digits-clients-tls"}
        assert "ca.key" not in secrets["digits-aggregator-tls"]["stringData"]
        assert all(value not in config["data"]["config.yaml"]
                   for secret in secrets.values() for value in secret["stringData"].values())
        assert [s["metadata"]["name"] for s in await cluster.list("services", "digits")] == \
            ["digits-aggregator"]
        job = await wait_until(lambda: _with_phase(cluster, "digits", "Pending"),
                               what="status Pending")
        assert condition(job, "Created")["status"] == "True"
        assert metric(metrics, "fedkube_jobs_created_total") == 1

        await run_pods(cluster, "digits")
        # The emulator marks the pods Running one at a time: the phase may turn Running on the
        # aggregator alone, and the ready count follows as the clients' events arrive.
        job = await wait_until(lambda: _running_with_ready(cluster, "digits", 3),
                               what="phase Running with 3 ready clients")
        assert condition(job, "Running")["status"] == "True"

        status.report = {"phase": "Running", "round": 2, "rounds": 3, "clientsConnected": 3,
                         "metrics": {"loss": 0.4, "accuracy": 0.9}}
        job = await wait_until(lambda: _round(cluster, "digits", 2), what="status.round 2")
        assert job["status"]["metrics"] == {"loss": 0.4, "accuracy": 0.9}
        assert job["status"]["clients"]["active"] == 3 and job["status"]["rounds"] == 3

        await cluster.set_pod_status("digits-aggregator", {"phase": "Succeeded"})
        job = await wait_until(lambda: _with_phase(cluster, "digits", "Succeeded"),
                               what="phase Succeeded")
        assert job["status"]["completionTime"]
        # cleanPodPolicy Running: running clients deleted, the finished aggregator kept.
        pods = await wait_until(lambda: _len_at_most(cluster.pods("digits"), 1),
                                what="running clients cleaned up")
        assert set(pods) == {"digits-aggregator"}
        assert metric(metrics, "fedkube_jobs_completed_total", {"result": "Succeeded"}) == 1
        assert metric(metrics, "fedkube_jobs", {"namespace": "ml", "phase": "Succeeded"}) == 1
        assert metric(metrics, "fedkube_operator_reconcile_total", {"result": "ok"}) > 3
        events = await cluster.list("events")
        reasons = {e["reason"] for e in events
                   if e.get("involvedObject", {}).get("name") == "digits"}
        assert {"ChildrenCreated", "AggregatorRunning", "AggregatorSucceeded"} <= reasons
        assert b"fedkube_operator_reconcile_duration_seconds" in generate_latest(
            metrics.registry)


async def test_failed_client_recreated_then_backoff_fails(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    spec = {**SPEC, "runPolicy": {"backoffLimit": 1}}
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("flaky", spec)
        await wait_until(lambda: _len_at_least(cluster.pods("flaky"), 4), what="pods")
        await run_pods(cluster, "flaky")
        await wait_until(lambda: _with_phase(cluster, "flaky", "Running"), what="Running")
        await cluster.set_pod_status("flaky-client-0", {"phase": "Failed", "reason": "Error"})
        job = await wait_until(lambda: _restarts(cluster, "flaky", 1), what="restart counted")
        assert condition(job, "Restarting")["status"] == "True"
        pods = await wait_until(lambda: _phase_of(cluster, "flaky", "flaky-client-0", "Pending"),
                                what="client-0 recreated")
        assert pods
        assert metric(metrics, "fedkube_pod_restarts_total", {"role": "client"}) == 1
        await cluster.set_pod_status("flaky-client-2", {"phase": "Failed"})
        job = await wait_until(lambda: _with_phase(cluster, "flaky", "Failed"), what="Failed")
        assert condition(job, "Failed")["reason"] == "BackoffLimitExceeded"
        assert job["status"]["restarts"] == 1


async def test_image_pull_failure_fails_after_grace_period(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    spec = {**SPEC, "runPolicy": {"stuckPodTimeoutSeconds": 1}}
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("badimage", spec)
        await wait_until(lambda: _len_at_least(cluster.pods("badimage"), 4), what="pods")
        await cluster.set_pod_status("badimage-client-1", {
            "phase": "Pending", "containerStatuses": [{"name": "client", "state": {"waiting": {
                "reason": "ImagePullBackOff", "message": "pull access denied"}}}]})
        job = await wait_until(lambda: _with_phase(cluster, "badimage", "Failed"),
                               what="Failed after the grace period")
        failed = condition(job, "Failed")
        assert failed["reason"] == "ImagePullBackOff"
        assert "badimage-client-1" in failed["message"] and "pull access denied" in \
            failed["message"]


async def test_suspend_and_resume(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("pause", SPEC)
        await wait_until(lambda: _len_at_least(cluster.pods("pause"), 4), what="pods")
        await cluster.patch_job("pause", {"spec": {"runPolicy": {"suspend": True}}})
        job = await wait_until(lambda: _with_phase(cluster, "pause", "Suspended"),
                               what="Suspended")
        await wait_until(lambda: _len_at_most(cluster.pods("pause"), 0), what="pods gone")
        assert condition(job, "Suspended")["status"] == "True"
        await cluster.patch_job("pause", {"spec": {"runPolicy": {"suspend": False}}})
        await wait_until(lambda: _len_at_least(cluster.pods("pause"), 4), what="pods back")
        job = await wait_until(lambda: _with_phase(cluster, "pause", "Pending"),
                               what="resumed")
        assert condition(job, "Suspended")["reason"] == "Resumed"
        assert job["status"]["observedGeneration"] == job["metadata"]["generation"]


async def test_operator_restart_makes_no_duplicates_and_scale_down(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    settings = operator_settings(url, status.url)
    async with running_operator(emulator, settings, metrics):
        await cluster.create_job("steady", SPEC)
        await wait_until(lambda: _len_at_least(cluster.pods("steady"), 4), what="pods")
        await run_pods(cluster, "steady")
        await wait_until(lambda: _with_phase(cluster, "steady", "Running"), what="Running")
    secrets = await cluster.list("secrets", "steady")
    creates_before = _creates(emulator)
    async with running_operator(emulator, settings, metrics):
        seen = passes(metrics)
        await wait_until(lambda: passes(metrics) >= seen + 3,
                         what="three passes of the new operator (its first and two resyncs)")
        assert _creates(emulator) == creates_before, "a restarted operator created objects"
        assert len(await cluster.pods("steady")) == 4
        assert await cluster.list("secrets", "steady") == secrets, "certificates re-issued"
        await cluster.patch_job("steady", {"spec": {"clients": {"replicas": 1},
                                                    "strategy": {"minClients": 1}}})
        pods = await wait_until(lambda: _len_at_most(cluster.pods("steady"), 2),
                                what="extra clients deleted")
        assert set(pods) == {"steady-aggregator", "steady-client-0"}


async def test_immutable_change_rejected(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("fixed", SPEC)
        await wait_until(lambda: _with_phase(cluster, "fixed", "Pending"), what="created")
        config = (await cluster.list("configmaps", "fixed"))[0]["data"]
        await cluster.patch_job("fixed", {"spec": {"strategy": {"name": "fedprox"}}})
        job = await wait_until(lambda: _has_condition(cluster, "fixed", "SpecRejected"),
                               what="SpecRejected")
        assert "spec.strategy" in condition(job, "SpecRejected")["message"]
        assert (await cluster.list("configmaps", "fixed"))[0]["data"] == config


async def test_job_deleted_children_go(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    async with running_operator(emulator, operator_settings(url, status.url),
                                metrics) as controller:
        await cluster.create_job("gone", SPEC)
        await wait_until(lambda: _len_at_least(cluster.pods("gone"), 4), what="pods")
        uid = (await cluster.job("gone"))["metadata"]["uid"]
        await cluster.delete_job("gone")
        await wait_until(lambda: _absent(cluster, "gone"), what="job deleted")
        # A pass that read the job before it went could still be creating what it missed;
        # the garbage collector would remove that too, but this test checks the passes after.
        await wait_until(lambda: _idle(controller), what="the passes in flight to end")
        seen = passes(metrics)
        assert await cluster.collect_garbage(uid) >= 8  # every child has the owner reference
        # The children's deletion events trigger passes; none may recreate anything.
        await wait_until(lambda: passes(metrics) > seen and _idle(controller),
                         what="the passes for the deleted children to finish")
        assert await cluster.pods("gone") == {}
        assert await cluster.list("configmaps", "gone") == []


async def test_sites_get_their_own_pods_volumes_and_placement(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    sample = yaml.safe_load((ROOT / "crds" / "samples" / "sites.yaml").read_text())
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("diagnosis", sample["spec"])
        pods = await wait_until(lambda: _len_at_least(cluster.pods("diagnosis"), 4),
                                what="the aggregator and one pod per site")
        assert set(pods) == {"diagnosis-aggregator", "diagnosis-north-0", "diagnosis-south-0",
                             "diagnosis-lab-0"}
        north = pods["diagnosis-north-0"]
        assert north["metadata"]["labels"]["fedkube.io/site"] == "north"
        assert north["spec"]["nodeSelector"] == {"topology.kubernetes.io/zone": "north-1"}
        volume = next(v for v in north["spec"]["volumes"] if v["name"] == "site-data")
        assert volume["persistentVolumeClaim"]["claimName"] == "north-records"
        job = await wait_until(lambda: _with_phase(cluster, "diagnosis", "Pending"),
                               what="status Pending")
        assert job["status"]["clients"]["desired"] == 3

        await run_pods(cluster, "diagnosis")
        await cluster.set_pod_status("diagnosis-south-0", {"phase": "Failed"})
        await wait_until(lambda: _phase_of(cluster, "diagnosis", "diagnosis-south-0", "Pending"),
                         what="the south site's client recreated")
        south = (await cluster.pods("diagnosis"))["diagnosis-south-0"]
        assert south["metadata"]["labels"]["fedkube.io/site"] == "south"
        assert any("csi" in v for v in south["spec"]["volumes"])

        # A site joins a running job: its pod, and the configuration it starts from.
        east = {"name": "east", "data": {"volume": {"hostPath": {"path": "/srv/east"}}}}
        await cluster.patch_job("diagnosis", {"spec": {"sites": [*sample["spec"]["sites"],
                                                                 east]}})
        await wait_until(lambda: _phase_of(cluster, "diagnosis", "diagnosis-east-0", "Pending"),
                         what="the new site's client pod")
        config = await wait_until(lambda: _config_mentions(cluster, "diagnosis", "east"),
                                  what="the ConfigMap to name the new site")
        assert "/srv/east" in config


async def test_hundred_jobs_all_reconciled(env: Any) -> None:
    emulator, cluster, status, metrics, url = env
    spec = {"rounds": 1, "clients": {"replicas": 2}, "strategy": {"minClients": 1}}
    # The production resync interval: the tests' 0.3 s times 100 jobs would be its own load.
    settings = dataclasses.replace(operator_settings(url, status.url), resync_seconds=10.0)
    async with running_operator(emulator, settings, metrics):
        await asyncio.gather(*(cluster.create_job(f"bulk-{i}", spec) for i in range(100)))
        await wait_until(lambda: _pod_count(cluster, 300), what="300 pods", timeout=45)
        jobs = await cluster.list("federatedjobs", group="/apis/fedkube.io/v1alpha1")
        assert len(jobs) == 100
        await wait_until(lambda: _all_have_status(cluster), what="every job's status")


async def test_a_steady_job_costs_no_api_requests(env: Any) -> None:
    """The operator's view of jobs and children comes from watch-fed caches: once a running
    job settles, its resync passes (every 0.3 s here) neither read nor write the API server;
    only the watch streams stay open."""
    emulator, cluster, status, metrics, url = env
    status.report = {"phase": "Running", "round": 1, "rounds": 3, "clientsConnected": 3,
                     "metrics": {"loss": 0.5}}
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("steady", SPEC)
        await wait_until(lambda: _len_at_least(cluster.pods("steady"), 4), what="pods")
        await run_pods(cluster, "steady")
        await wait_until(lambda: _round(cluster, "steady", 1), what="running, round 1")
        settled = _QuietWindow(emulator, metrics, window=3)
        await wait_until(settled.quiet, what="3 passes in a row without API requests")
        # Then many more passes (several resyncs) cost nothing either.
        mark, start = len(emulator._requests), passes(metrics)
        await wait_until(lambda: passes(metrics) >= start + 10, what="10 more passes")
        assert _api_calls(emulator, mark) == []


class _QuietWindow:
    """Truthy once ``window`` passes in a row made no API request (besides watches)."""

    def __init__(self, emulator: FedkubeEmulator, metrics: OperatorMetrics, window: int) -> None:
        self.emulator, self.metrics, self.window = emulator, metrics, window
        self.mark, self.start = len(emulator._requests), passes(metrics)

    def quiet(self) -> bool:
        if passes(self.metrics) < self.start + self.window:
            return False
        if not _api_calls(self.emulator, self.mark):
            return True
        self.mark, self.start = len(self.emulator._requests), passes(self.metrics)
        return False


def _api_calls(emulator: FedkubeEmulator, since: int) -> list[str]:
    """The requests after the first ``since``, but for watches: method and path."""
    from kmock._internal import enums
    return [f"{r.method} {r.url}" for r in emulator._requests[since:]
            if r.action != enums.action.WATCH]


def passes(metrics: OperatorMetrics) -> float:
    """Reconcile passes finished so far."""
    return sum(metric(metrics, "fedkube_operator_reconcile_total", {"result": result})
               for result in ("ok", "error"))


# --- polling helpers (each returns something truthy when the wait is over) ---------------
def _idle(controller: Controller) -> bool:
    """No reconcile pass is running (the operator runs in its own thread: copy, then read)."""
    return not any(task.get_name().startswith("reconcile ") for task in list(controller.tasks))


async def _len_at_least(pods: Any, n: int) -> dict[str, Any] | None:
    found = await pods
    return found if len(found) >= n else None


async def _len_at_most(pods: Any, n: int) -> dict[str, Any] | bool | None:
    found = await pods
    return (found or True) if len(found) <= n else None


async def _with_phase(cluster: Cluster, name: str, want: str) -> dict[str, Any] | None:
    job = await cluster.job(name)
    return job if phase(job) == want else None


async def _running_with_ready(cluster: Cluster, name: str, ready: int) -> dict[str, Any] | None:
    job = await _with_phase(cluster, name, "Running")
    return job if job is not None and job["status"]["clients"]["ready"] == ready else None


async def _round(cluster: Cluster, name: str, want: int) -> dict[str, Any] | None:
    job = await cluster.job(name)
    return job if (job or {}).get("status", {}).get("round") == want else None


async def _restarts(cluster: Cluster, name: str, want: int) -> dict[str, Any] | None:
    job = await cluster.job(name)
    return job if (job or {}).get("status", {}).get("restarts") == want else None


async def _phase_of(cluster: Cluster, job: str, pod: str, want: str) -> bool:
    pods = await cluster.pods(job)
    return pod in pods and (pods[pod].get("status") or {}).get("phase", "Pending") == want


async def _has_condition(cluster: Cluster, name: str, type_: str) -> dict[str, Any] | None:
    job = await cluster.job(name)
    conditions = (job or {}).get("status", {}).get("conditions") or []
    return job if any(c["type"] == type_ and c["status"] == "True" for c in conditions) \
        else None


async def _config_mentions(cluster: Cluster, job: str, text: str) -> str | None:
    (config,) = await cluster.list("configmaps", job)
    found: str = config["data"]["config.yaml"]
    return found if text in found else None


async def _absent(cluster: Cluster, name: str) -> bool:
    return await cluster.job(name) is None


async def _pod_count(cluster: Cluster, n: int) -> bool:
    return len(await cluster.list("pods")) >= n


async def _all_have_status(cluster: Cluster) -> bool:
    jobs = await cluster.list("federatedjobs", group="/apis/fedkube.io/v1alpha1")
    return all(phase(j) == "Pending" for j in jobs)


def _creates(emulator: FedkubeEmulator) -> int:
    from kmock._internal import enums
    return sum(1 for r in emulator._requests if r.action == enums.action.CREATE
               and r.resource is not None and str(r.resource.plural) != "events")


async def test_throttling_and_server_errors_are_retried_not_failed(env: Any) -> None:
    """The API server throttles the ConfigMap create (429), fails pod creates (503, 500) and
    a status patch (500): each call is retried with backoff, the pass still completes, and
    nothing is created twice."""
    emulator, cluster, status, metrics, url = env
    faults = [emulator.inject(Fault("CREATE", "configmaps", 429, times=2)),
              emulator.inject(Fault("CREATE", "pods", 503, times=2)),
              emulator.inject(Fault("CREATE", "pods", 500, times=1)),
              emulator.inject(Fault("UPDATE", "federatedjobs", 500, times=1,
                                    subresource="status"))]
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("flaky", SPEC)
        pods = await wait_until(lambda: _len_at_least(cluster.pods("flaky"), 4),
                                what="all pods despite the errors")
        await wait_until(lambda: _with_phase(cluster, "flaky", "Pending"), what="status written")
    assert [fault.times for fault in faults] == [0, 0, 0, 0], "every fault was met"
    assert len(pods) == 4
    assert metric(metrics, "fedkube_operator_reconcile_total", {"result": "error"}) == 0


async def test_an_expired_watch_is_listed_again_and_nothing_is_missed(env: Any) -> None:
    """The API server answers watches with 410 Gone (its history compacted): the operator
    lists again, watches again, and still reconciles a job created meanwhile."""
    emulator, cluster, status, metrics, url = env
    gone = [emulator.inject(Fault("WATCH", "federatedjobs", 410, times=2)),
            emulator.inject(Fault("WATCH", "pods", 410, times=2))]
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("after-gone", SPEC)
        await wait_until(lambda: _len_at_least(cluster.pods("after-gone"), 4),
                         what="the job's pods after the watches expired")
    assert [fault.times for fault in gone] == [0, 0]



async def test_cert_manager_issues_the_certificates_and_a_site_leaving_loses_its_own(
        env: Any) -> None:
    """Mode CertManager: the operator asks cert-manager (Certificate resources) instead of
    issuing Secrets; each pod mounts the Secret its Certificate names; a site removed from
    the job loses its Certificate and the Secret cert-manager wrote for it."""
    emulator, cluster, status, metrics, url = env
    issuer = {"name": "fedkube-ca", "kind": "ClusterIssuer"}
    sites = [{"name": name, "data": {"volume": {"hostPath": {"path": f"/srv/{name}"}}}}
             for name in ("north", "south")]
    spec = {**SPEC, "sites": sites, "strategy": {"minClients": 2},
            "security": {"tls": {"mode": "CertManager", "issuerRef": issuer}}}
    certificates_api = "/apis/cert-manager.io/v1"
    async with running_operator(emulator, operator_settings(url, status.url), metrics):
        await cluster.create_job("cm", spec)
        pods = await wait_until(lambda: _len_at_least(cluster.pods("cm"), 3), what="pods")
        certificates = {c["metadata"]["name"]: c for c in await cluster.list(
            "certificates", "cm", group=certificates_api)}
        assert set(certificates) == {"cm-aggregator-tls", "cm-site-north-tls",
                                     "cm-site-south-tls"}
        assert all(c["spec"]["issuerRef"] == {**issuer, "group": "cert-manager.io"}
                   for c in certificates.values())
        assert await cluster.list("secrets", "cm") == []  # cert-manager writes them
        for name, pod in pods.items():
            (mounted,) = [v["secret"]["secretName"] for v in pod["spec"]["volumes"]
                          if "secret" in v]
            assert mounted in certificates, name
        # cert-manager fills south's Secret (labelled by the Certificate's secretTemplate).
        south = certificates["cm-site-south-tls"]["spec"]
        await cluster.create("secrets", {
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": south["secretName"], "labels": south["secretTemplate"]["labels"]},
            "stringData": {"tls.crt": "-", "tls.key": "-", "ca.crt": "-"}})
        await cluster.patch_job("cm", {"spec": {"sites": sites[:1],
                                                "strategy": {"minClients": 1}}})
        await wait_until(lambda: _names_are(cluster.list("certificates", "cm",
                                                         group=certificates_api),
                                            {"cm-aggregator-tls", "cm-site-north-tls"}),
                         what="south's Certificate deleted")
        assert await cluster.list("secrets", "cm") == []


async def _names_are(objects: Any, names: set[str]) -> bool:
    return {o["metadata"]["name"] for o in await objects} == names
