"""The shipped ``fedkube operator`` command, driven by the real ``kubectl``, as users run both.

The operator runs as a subprocess with exactly the command and arguments that the chart's
Deployment renders (``helm template``), logs in through a kubeconfig, and serves the API
emulator; the test acts as the user and as kubelet with ``kubectl`` alone. This is the test
that an in-process harness with its own arguments could not be: it once hid an operator that
watched nothing because kopf's peering object did not exist.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from emulator import EmulatorThread, InjectedError

from fedkube import pki
from fedkube.bundle import Bundle, secret_values
from fedkube.federation.security import TlsFiles
from tests.chart.conftest import load_hack

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "crds" / "samples" / "digits.yaml"
SITES_SAMPLE = ROOT / "crds" / "samples" / "sites.yaml"
CLIENT_ONLY_SAMPLE = ROOT / "crds" / "samples" / "client-only.yaml"
POD_ID = "fedkube-operator-7d9c-test"  # the chart sets POD_ID to the operator pod's name
PEERING_LIFETIME = 15  # the chart's default peering.lifetime
T = TypeVar("T")


def wait_for(check: Callable[[], T], *, what: str, timeout: float = 60.0) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    """helm and kubectl: on PATH, or installed into .tools/bin as `make test` does."""
    installed: dict[str, Path] = load_hack("install_tools").install()
    return installed


def chart_operator_argv(helm: Path, health_port: int, metrics_port: int) -> list[str]:
    """The operator container's command and arguments, as the chart's Deployment has them."""
    rendered = subprocess.run(
        [str(helm), "template", "fedkube", str(ROOT / "charts" / "fedkube"),
         "--set", f"health.port={health_port}", "--set", f"metrics.port={metrics_port}"],
        capture_output=True, text=True, check=True).stdout
    (deployment,) = [d for d in yaml.safe_load_all(rendered)
                     if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"] for e in container.get("env", [])}
    assert "POD_ID" in env, "the chart names kopf's peer after its pod"
    argv: list[str] = container["command"] + container["args"]
    return argv


class Kubectl:
    """The real kubectl against the emulator (``--validate=false``: no OpenAPI served)."""

    def __init__(self, binary: Path, kubeconfig: Path) -> None:
        self.binary, self.env = str(binary), {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([self.binary, *args], env=self.env, capture_output=True,
                              text=True, timeout=60, check=False)
        if check:
            assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
        return done

    def out(self, *args: str) -> str:
        return self.run(*args).stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.out(*args, "-o", "json"))

    def pods(self, job: str) -> dict[str, dict[str, Any]]:
        """The job's pods by name (the emulator ignores label selectors: filtered here)."""
        items = self.json("get", "pods", "-l", f"fedkube.io/job={job}")["items"]
        return {p["metadata"]["name"]: p for p in items
                if p["metadata"].get("labels", {}).get("fedkube.io/job") == job}

    def job(self, name: str) -> dict[str, Any] | None:
        """The job, or None when it does not exist. Listed, since the emulator cannot answer
        kubectl's follow-up question on a missing object (does the namespace exist?)."""
        jobs = self.json("get", "fj")["items"]
        return next((j for j in jobs if j["metadata"]["name"] == name), None)

    def set_pod_status(self, name: str, status: dict[str, Any]) -> None:
        """Play kubelet."""
        self.out("patch", "pod", name, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))


class OperatorProcess:
    """``fedkube operator`` as a subprocess; its log goes to a file the test can show."""

    def __init__(self, argv: list[str], kubeconfig: Path, log: Path,
                 pod_id: str = POD_ID) -> None:
        # The chart runs `fedkube` from the image's PATH; here, the virtualenv's.
        self.argv = [str(Path(sys.executable).with_name(argv[0])), *argv[1:]]
        self.log = log
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_ID": pod_id,
                    # No aggregator runs here: status polls go to a port nobody serves.
                    "FEDKUBE_STATUS_URL": f"http://127.0.0.1:{free_port()}/status"}
        self.env.pop("FEDKUBE_KUBE_SERVER", None)
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OperatorProcess:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM, as kubelet sends it; returns the exit code and the seconds it took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started


@pytest.fixture
def cluster() -> Iterator[EmulatorThread]:
    """The API emulator with kopf's peering CRDs, as the chart installs them, and no peering
    object: the chart's own may not be there yet (or was deleted)."""
    with EmulatorThread(peering=True) as emulator:
        yield emulator


def start_operator(tools: dict[str, Path], cluster: EmulatorThread, tmp_path: Path,
                   *extra: str, pod_id: str = POD_ID) -> tuple[OperatorProcess, Kubectl]:
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    argv = chart_operator_argv(tools["helm"], free_port(), free_port()) + list(extra)
    return OperatorProcess(argv, kubeconfig, tmp_path / f"{pod_id}.log", pod_id), \
        Kubectl(tools["kubectl"], kubeconfig)


def wait_watching(cluster: EmulatorThread, operator: OperatorProcess) -> None:
    """Pitfall 2: objects created before the watch subscribes are never announced."""
    assert operator.process is not None
    wait_for(lambda: cluster.watching() or operator.process.poll() is not None,  # type: ignore[union-attr]
             what="the operator to watch jobs and pods")
    assert operator.process.poll() is None, f"the operator exited:\n{operator.output()}"


@pytest.mark.parametrize("standalone", [True, False], ids=["standalone", "peering"])
def test_operator_command_runs_a_job_as_a_user_drives_it(
        tools: dict[str, Path], cluster: EmulatorThread, tmp_path: Path,
        standalone: bool) -> None:
    operator, kubectl = start_operator(tools, cluster, tmp_path,
                                       *(["--standalone"] if standalone else []))
    with operator:
        wait_watching(cluster, operator)
        peerings = kubectl.json("get", "clusterkopfpeerings")["items"]
        if standalone:
            assert peerings == []
        else:
            # No peering object existed: the operator created it and keeps its record there.
            (peering,) = peerings
            assert peering["metadata"]["name"] == "fedkube"
            assert POD_ID in (peering.get("status") or {})

        assert "federatedjob.fedkube.io/digits created" in kubectl.out(
            "apply", "-f", str(SAMPLE), "--validate=false")
        pods = wait_for(lambda: (p := kubectl.pods("digits")) and len(p) == 6 and p,
                        what="the aggregator and 5 client pods")
        job = kubectl.job("digits")
        assert job is not None
        for pod in pods.values():
            (owner,) = pod["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == \
                ("FederatedJob", "digits", job["metadata"]["uid"], True)
        roles = sorted(p["metadata"]["labels"]["fedkube.io/role"] for p in pods.values())
        assert roles == ["aggregator"] + ["client"] * 5
        children = {kind: [o for o in kubectl.json("get", kind)["items"]
                           if o["metadata"].get("labels", {}).get("fedkube.io/job") == "digits"]
                    for kind in ("configmap", "secret", "service")}
        assert sorted(o["metadata"]["name"] for o in children["secret"]) == \
            ["digits-aggregator-tls", "digits-ca", "digits-clients-tls"]
        for child in [o for objects in children.values() for o in objects]:
            assert child["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

        table = kubectl.out("get", "fj")
        header, row = table.splitlines()[:2]
        assert header.split() == ["NAME", "PHASE", "ROUND", "CLIENTS", "ACCURACY", "AGE"]
        assert row.split()[:2] == ["digits", "Pending"]

        for name in pods:
            kubectl.set_pod_status(name, {"phase": "Running"})
        wait_for(lambda: (kubectl.job("digits") or {}).get("status", {}).get("clients", {})
                 .get("ready") == 5, what="5 ready clients")
        job = kubectl.job("digits")
        assert job is not None and job["status"]["phase"] == "Running"
        assert kubectl.out("get", "fj", "digits").splitlines()[1].split()[1:4] == \
            ["Running", "0", "5"]

        failed_uid = pods["digits-client-2"]["metadata"]["uid"]
        kubectl.set_pod_status("digits-client-2", {"phase": "Failed", "containerStatuses": [{
            "name": "client", "state": {"terminated": {
                "exitCode": 1, "reason": "Error", "message": "CUDA error: device lost"}}}]})
        recreated = wait_for(
            lambda: (p := kubectl.pods("digits").get("digits-client-2")) and
            p["metadata"]["uid"] != failed_uid and p,
            what="the failed client pod deleted and created anew")
        assert "phase" not in (recreated.get("status") or {})
        job = wait_for(lambda: (j := kubectl.job("digits")) and
                       j["status"].get("restarts") == 1 and j, what="restarts counted")
        restarting = next(c for c in job["status"]["conditions"] if c["type"] == "Restarting")
        assert restarting["status"] == "True"

        described = wait_for(lambda: (d := kubectl.out("describe", "fj", "digits")) and
                             "PodFailed" in d and d, what="the PodFailed event")
        events = described.split("Events:", 1)[1]
        assert "ChildrenCreated" in events and "AggregatorRunning" in events
        assert "digits-client-2" in events and "device lost" in events

        assert 'federatedjob.fedkube.io "digits" deleted' in kubectl.out(
            "delete", "fj", "digits", "--wait=false")
        wait_for(lambda: kubectl.job("digits") is None,
                 what="the job gone (no finalizer left holding it)")

        code, _ = operator.terminate()
        log = operator.output()
        assert code == 0, log
        assert "Traceback" not in log, log


def fedkube(kubectl: Kubectl, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``fedkube`` command as a user runs it, logged in as kubectl is."""
    return subprocess.run([str(Path(sys.executable).with_name("fedkube")), *args],
                          env=kubectl.env, capture_output=True, text=True, timeout=60)


def test_sites_get_their_own_certificates_bundles_and_revocation(
        tools: dict[str, Path], cluster: EmulatorThread, tmp_path: Path) -> None:
    operator, kubectl = start_operator(tools, cluster, tmp_path, "--standalone")
    with operator:
        wait_watching(cluster, operator)
        kubectl.out("apply", "-f", str(SITES_SAMPLE), "--validate=false")

        def secrets() -> dict[str, dict[str, Any]]:
            return {s["metadata"]["name"]: s for s in kubectl.json("get", "secrets")["items"]
                    if s["metadata"].get("labels", {}).get("fedkube.io/job") == "diagnosis"}

        sites = [f"diagnosis-site-{site}-tls" for site in ("north", "south", "lab")]
        found = wait_for(lambda: (s := secrets()) and len(s) == 5 and s,
                         what="the CA, the aggregator's and three sites' Secrets")
        assert set(found) == {"diagnosis-ca", "diagnosis-aggregator-tls", *sites}
        ca_cert = secret_values(found["diagnosis-ca"], "ca")["ca.crt"]
        pods = wait_for(lambda: (p := kubectl.pods("diagnosis")) and len(p) == 4 and p,
                        what="the aggregator and one client per site")
        for name, pod in pods.items():
            mounted = {v["secret"]["secretName"] for v in pod["spec"]["volumes"]
                       if "secret" in v}
            site = name.removeprefix("diagnosis-").rsplit("-", 1)[0]
            assert mounted == ({"diagnosis-aggregator-tls"} if name == "diagnosis-aggregator"
                               else {f"diagnosis-site-{site}-tls"}), name
        service = kubectl.json("get", "service", "diagnosis-aggregator")
        assert service["spec"]["type"] == "LoadBalancer"
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]
        metrics = kubectl.json("get", "service", "diagnosis-aggregator-metrics")
        assert metrics["spec"]["type"] == "ClusterIP"

        # The site's admin hands out the bundle; it holds the site's key, for its eyes only.
        bundle_file = tmp_path / "south.yaml"
        done = fedkube(kubectl, "bundle", "diagnosis", "south", "-o", str(bundle_file))
        assert done.returncode == 0, done.stderr
        assert bundle_file.stat().st_mode & 0o777 == 0o600
        bundle = Bundle.read(bundle_file)
        namespace = found["diagnosis-ca"]["metadata"]["namespace"]  # the kubeconfig's
        assert (bundle.address, bundle.namespace, bundle.job, bundle.site) == \
            ("fl.diagnosis.example:50051", namespace, "diagnosis", "south")
        assert bundle.files.ca.decode() == ca_cert
        identity = pki.identity_of(bundle.files.certificate())
        assert identity == pki.Identity(namespace, "diagnosis", "south")

        # South leaves the federation: its certificate goes in the same reconcile that
        # rewrites the configuration the aggregator reads.
        job = kubectl.job("diagnosis")
        assert job is not None
        remaining = [s for s in job["spec"]["sites"] if s["name"] != "south"]
        kubectl.out("patch", "fj", "diagnosis", "--type=merge", "-p", json.dumps(
            {"spec": {"sites": remaining, "strategy": {"minClients": 2}}}))
        wait_for(lambda: "diagnosis-site-south-tls" not in secrets(),
                 what="south's certificate deleted")
        config = kubectl.json("get", "configmap", "diagnosis-config")["data"]["config.yaml"]
        assert "name: south" not in config and "name: north" in config
        wait_for(lambda: "diagnosis-south-0" not in kubectl.pods("diagnosis"),
                 what="south's client pod deleted")
        events = wait_for(lambda: (d := kubectl.out("describe", "fj", "diagnosis")) and
                          "SiteRevoked" in d and d.split("Events:", 1)[1],
                          what="the SiteRevoked event")
        assert "site south is no longer in the job" in events
        refused = fedkube(kubectl, "bundle", "diagnosis", "south")
        assert refused.returncode == 1
        assert f"job {namespace}/diagnosis has no site 'south' (its sites: north, lab)" in \
            refused.stderr.replace("\n", " ")


def test_a_client_only_job_runs_only_its_sites_clients(
        tools: dict[str, Path], cluster: EmulatorThread, tmp_path: Path) -> None:
    """The lab's own cluster: the bundle the federation's admin sent, applied as is, and the
    client-only sample. Only the lab's clients appear, started from the mounted bundle."""
    now, valid = datetime.now(UTC), timedelta(days=1)
    ca = pki.issue_ca("hospitals", "diagnosis", now, valid)
    pair = pki.issue_client(ca, pki.Identity("hospitals", "diagnosis", "lab"), now, valid)
    bundle = tmp_path / "lab-bundle.yaml"
    bundle.write_text(yaml.safe_dump(Bundle("fl.diagnosis.example:50051", "hospitals",
                                            "diagnosis", "lab",
                                            TlsFiles(ca.cert, pair.cert, pair.key)).to_secret()))
    operator, kubectl = start_operator(tools, cluster, tmp_path, "--standalone")
    with operator:
        wait_watching(cluster, operator)
        assert "secret/diagnosis-lab-bundle created" in kubectl.out(
            "apply", "-f", str(bundle), "--validate=false")
        kubectl.out("apply", "-f", str(CLIENT_ONLY_SAMPLE), "--validate=false")
        pods = wait_for(lambda: kubectl.pods("diagnosis-lab"), what="the lab's client pod")
        assert list(pods) == ["diagnosis-lab-lab-0"]
        (container,) = pods["diagnosis-lab-lab-0"]["spec"]["containers"]
        assert container["args"] == ["client", "--bundle", "/var/run/secrets/fedkube/bundle",
                                     "--replica", "0", "--data", "/data"]
        volumes = {v["name"]: v for v in pods["diagnosis-lab-lab-0"]["spec"]["volumes"]}
        assert volumes["bundle"]["secret"]["secretName"] == "diagnosis-lab-bundle"
        assert volumes["site-data"]["persistentVolumeClaim"]["claimName"] == "lab-records"
        # Nothing else: no aggregator, configuration, Service or certificates of its own.
        for kind in ("configmap", "service", "secret"):
            mine = [o["metadata"]["name"] for o in kubectl.json("get", kind)["items"]
                    if o["metadata"].get("labels", {}).get("fedkube.io/job") == "diagnosis-lab"]
            assert mine == [], kind
        kubectl.set_pod_status("diagnosis-lab-lab-0", {"phase": "Running"})
        wait_for(lambda: (kubectl.job("diagnosis-lab") or {}).get("status", {})
                 .get("phase") == "Running", what="phase Running")
        # The remote aggregator finished: the client exits 0.
        kubectl.set_pod_status("diagnosis-lab-lab-0", {"phase": "Succeeded"})
        job = wait_for(lambda: (j := kubectl.job("diagnosis-lab")) and
                       j["status"].get("phase") == "Succeeded" and j, what="Succeeded")
        succeeded = next(c for c in job["status"]["conditions"] if c["type"] == "Succeeded")
        assert succeeded["reason"] == "ClientsSucceeded"
        # The site's bundle is the site admin's: the operator leaves it alone.
        assert kubectl.json("get", "secret", "diagnosis-lab-bundle")["metadata"]["name"]


def test_one_replica_reconciles_and_another_takes_over_after_a_crash(
        tools: dict[str, Path], cluster: EmulatorThread, tmp_path: Path) -> None:
    """Two replicas as the chart runs them: the first reconciles, the second stands by; the
    first is SIGKILLed (no goodbye in the peering object) and the second takes over within
    the peering lifetime, without creating anything twice, and Events go on."""
    first, kubectl = start_operator(tools, cluster, tmp_path, pod_id="fedkube-operator-a")
    second, _ = start_operator(tools, cluster, tmp_path, pod_id="fedkube-operator-b")
    with ExitStack() as running:
        running.enter_context(first)
        wait_watching(cluster, first)
        running.enter_context(second)  # started second: ranked below the first
        # Both replicas are in the peering object, the one that started first ranked
        # higher; kopf keeps the other paused (silently: it starts paused).
        def peers() -> dict[str, Any]:
            (peering,) = kubectl.json("get", "clusterkopfpeerings")["items"]
            return dict(peering.get("status") or {})

        records = wait_for(lambda: (p := peers()) and len(p) == 2 and p,
                           what="both replicas in the peering object")
        assert records["fedkube-operator-a"]["priority"] > \
            records["fedkube-operator-b"]["priority"]
        assert {peer["lifetime"] for peer in records.values()} == {PEERING_LIFETIME}
        kubectl.out("apply", "-f", str(SAMPLE), "--validate=false")
        pods = wait_for(lambda: (p := kubectl.pods("digits")) and len(p) == 6 and p,
                        what="the job's pods")
        for name in pods:
            kubectl.set_pod_status(name, {"phase": "Running"})
        wait_for(lambda: (kubectl.job("digits") or {}).get("status", {}).get("phase") ==
                 "Running", what="phase Running")
        assert "ChildrenCreated" in first.output()
        assert "fedkube.operator" not in second.output(), "the standby replica reconciled"

        assert first.process is not None
        first.process.kill()
        killed = time.monotonic()
        failed = pods["digits-client-1"]["metadata"]["uid"]
        kubectl.set_pod_status("digits-client-1", {"phase": "Failed"})
        wait_for(lambda: (p := kubectl.pods("digits").get("digits-client-1")) and
                 p["metadata"]["uid"] != failed, what="the new replica to replace the failed pod",
                 timeout=PEERING_LIFETIME + 30)
        handover = time.monotonic() - killed
        print(f"hand-over after SIGKILL: {handover:.1f} s (peering lifetime "
              f"{PEERING_LIFETIME} s)")
        assert handover < PEERING_LIFETIME + 10
        assert "PodFailed" in second.output()
        # Nothing else was recreated or created twice: the other pods are the same objects.
        after = {name: pod["metadata"]["uid"] for name, pod in kubectl.pods("digits").items()}
        assert len(after) == 6
        assert {n: u for n, u in after.items() if n != "digits-client-1"} == \
            {n: p["metadata"]["uid"] for n, p in pods.items() if n != "digits-client-1"}


def test_an_operator_killed_again_and_again_converges_and_counts_once(
        tools: dict[str, Path], cluster: EmulatorThread, tmp_path: Path) -> None:
    """A job lives through creation, running, a failed client, a scale-down and success,
    with the operator SIGKILLed in every stage after a random number of its own writes (or
    once the stage is done) and started anew. Children and status converge, the failure is
    counted once, and nothing is created twice."""
    rng = random.Random(13)
    kills: list[bool] = []
    kubectl = Kubectl(tools["kubectl"], cluster.kubeconfig(tmp_path / "kubeconfig"))
    kubectl.out("apply", "-f", str(SAMPLE), "--validate=false")

    def job() -> dict[str, Any]:
        return kubectl.job("digits") or {}

    def live(cycle: int, done: Callable[[], bool]) -> None:
        """One operator's life: SIGKILLed as it makes its k-th write (k from 1 to 4), which
        is then never served, or once ``done``."""
        operator, _ = start_operator(tools, cluster, tmp_path, "--standalone",
                                     pod_id=f"operator-{cycle}")
        limit, seen = rng.randint(1, 4), []

        def kill_at_limit(request: Any) -> None:
            if str(request.resource.plural) == "events" or operator.process is None:
                return
            seen.append(request)
            if len(seen) >= limit and operator.process.poll() is None:
                operator.process.kill()
                raise InjectedError(status=503)  # the request dies with its sender

        assert cluster.emulator is not None
        cluster.emulator.before_writes(kill_at_limit)
        try:
            with operator:
                assert operator.process is not None
                wait_for(lambda: operator.process.poll() is not None or done(),  # type: ignore[union-attr]
                         what=f"operator {cycle} killed at write {limit}, or its stage done")
        finally:
            cluster.emulator.before_writes(None)
        kills.append(len(seen) >= limit)

    def until(cycle: int, done: Callable[[], bool]) -> None:
        """Operators live and die until the stage is done."""
        while not done():
            live(cycle, done)
            cycle += 100

    pods = lambda: kubectl.pods("digits")  # noqa: E731
    until(0, lambda: len(pods()) == 6)
    first_uids = {name: pod["metadata"]["uid"] for name, pod in pods().items()}
    for name in pods():
        kubectl.set_pod_status(name, {"phase": "Running"})
    until(1, lambda: job().get("status", {}).get("phase") == "Running"
          and job()["status"]["clients"]["ready"] == 5)
    failed = pods()["digits-client-2"]["metadata"]["uid"]
    kubectl.set_pod_status("digits-client-2", {"phase": "Failed"})
    until(2, lambda: (p := pods().get("digits-client-2")) is not None
          and p["metadata"]["uid"] != failed)
    kubectl.set_pod_status("digits-client-2", {"phase": "Running"})
    kubectl.out("patch", "fj", "digits", "--type=merge", "-p", json.dumps(
        {"spec": {"clients": {"replicas": 3}, "strategy": {"minClients": 3}}}))
    until(3, lambda: sorted(pods()) == ["digits-aggregator", "digits-client-0",
                                        "digits-client-1", "digits-client-2"])
    kept = {name for name, pod in pods().items()
            if pod["metadata"]["uid"] == first_uids[name]}
    assert kept == {"digits-aggregator", "digits-client-0", "digits-client-1"}
    kubectl.set_pod_status("digits-aggregator", {"phase": "Succeeded"})
    until(4, lambda: job().get("status", {}).get("phase") == "Succeeded")

    # One more operator, left to finish: everything has converged.
    operator, _ = start_operator(tools, cluster, tmp_path, "--standalone", pod_id="last")
    with operator:
        wait_watching(cluster, operator)
        final = wait_for(lambda: (j := job()) and j["status"]["phase"] == "Succeeded"
                         and sorted(pods()) == ["digits-aggregator"] and j,
                         what="Succeeded, clients cleaned up (cleanPodPolicy Running)")
    status = final["status"]
    assert status["restarts"] == 1, status
    assert {c["type"] for c in status["conditions"] if c["status"] == "True"} == \
        {"Created", "Succeeded"}
    # Nothing was recreated but the failed client: the aggregator is the very first one.
    assert pods()["digits-aggregator"]["metadata"]["uid"] == first_uids["digits-aggregator"]
    print(f"operators started: {len(kills)}, killed mid-pass: {sum(kills)}")
    assert sum(kills) >= 5


def test_operator_command_exits_fast_on_sigterm_with_a_hundred_jobs(
        tools: dict[str, Path], cluster: EmulatorThread, tmp_path: Path) -> None:
    """kubelet sends SIGTERM and kills the pod after terminationGracePeriodSeconds (30 s by
    default): the operator must be out well before, however many jobs it serves."""
    operator, kubectl = start_operator(tools, cluster, tmp_path)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump_all([
        {"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
         "metadata": {"name": f"bulk-{i}"},
         "spec": {"rounds": 1, "clients": {"replicas": 2}, "strategy": {"minClients": 1}}}
        for i in range(100)]))
    with operator:
        wait_watching(cluster, operator)
        kubectl.out("apply", "-f", str(jobs), "--validate=false")
        wait_for(lambda: cluster.count("pods") >= 300, what="300 pods", timeout=90)
        code, seconds = operator.terminate()
        print(f"SIGTERM with 100 jobs: exit code {code} after {seconds:.2f} s")
        log = operator.output()
        assert code == 0, log
        assert seconds < 10, f"SIGTERM took {seconds:.1f} s with 100 jobs\n{log[-3000:]}"
        assert "Traceback" not in log and "Unprocessed streams" not in log, log[-3000:]


def test_operator_command_without_peering_crds_says_what_to_do(
        tools: dict[str, Path], tmp_path: Path) -> None:
    """kopf alone would wait silently for ever; the operator exits, naming the object and the
    fix, which a pod shows as its last log line."""
    with EmulatorThread(peering=False) as cluster:
        operator, _ = start_operator(tools, cluster, tmp_path)
        with operator:
            assert operator.process is not None
            code = operator.process.wait(timeout=60)
        log = operator.output()
    assert code == 2, log
    last = log.strip().splitlines()[-1]
    assert "ClusterKopfPeering 'fedkube' does not exist" in last
    assert "kubectl apply -f charts/fedkube/crds/kopf.dev_peerings.yaml" in last
    assert "--standalone" in last
