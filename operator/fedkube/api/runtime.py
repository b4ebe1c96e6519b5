"""The contract between the operator (or ``fedkube run``) and the pods it starts.

The operator writes a :class:`RuntimeConfig` into the job's ConfigMap; the aggregator and
every client read it with ``--config``. The aggregator serves an :class:`AggregatorReport`
as JSON on ``GET /status`` of its metrics port; the operator polls it into the job's status.
A pod whose configuration cannot work exits with :data:`EXIT_INVALID_CONFIGURATION` and
says why in its last log line, which the operator reads as the container's termination
message.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from fedkube.api.spec import FederatedJobSpec
from fedkube.api.status import JobMetrics
from fedkube.api.types import ApiModel

CONFIG_MOUNT_PATH = "/etc/fedkube/config.yaml"
#: Where a pod's TLS Secret is mounted: ``ca.crt``, ``tls.crt`` and ``tls.key``, the layout of
#: a ``kubernetes.io/tls`` Secret as the operator and cert-manager write it.
TLS_MOUNT_DIR = "/var/run/secrets/fedkube/tls"
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
#: The aggregator's one writable volume (an emptyDir, or the job's claim): checkpoints and
#: the final model live in folders the aggregator creates, so no subPath (which the kubelet
#: would create root-owned, unwritable for the non-root aggregator) is needed.
STATE_DIR = "/var/lib/fedkube"
CHECKPOINT_DIR = f"{STATE_DIR}/checkpoints"
OUTPUT_DIR = f"{STATE_DIR}/output"

EXIT_INVALID_CONFIGURATION = 2
"""Exit code of an aggregator or client whose configuration cannot work (a task that does not
import, a refused credential): a new pod would fail the same way, so the operator fails the
job at once instead of spending ``runPolicy.backoffLimit`` on it."""


class ConfigurationError(ValueError):
    """The job's configuration cannot work; the message names the field and the fix."""


def last_line(output: str | None) -> str:
    """The last non-blank line of a pod's or process's output: its error, by the contract
    above ("" when there is none)."""
    lines = [line.strip() for line in (output or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


class RuntimeConfig(ApiModel):
    """Everything a pod (or a local process) needs to take part in one job."""

    job_name: str
    """Name of the FederatedJob; a label on every metric."""

    namespace: str = "default"
    """Namespace of the FederatedJob; a label on every metric."""

    spec: FederatedJobSpec
    """The job's spec with every default resolved."""

    aggregator_address: str
    """``host:port`` the clients dial (the aggregator's Service in a cluster)."""

    bind_address: str = "0.0.0.0"
    """Address the aggregator's gRPC and HTTP servers listen on."""

    tls_dir: str = TLS_MOUNT_DIR
    """Folder with this pod's ``ca.crt`` (the job's CA), ``tls.crt`` and ``tls.key`` (its
    certificate: the aggregator's, or its site's); see :attr:`tls_folder`."""

    checkpoint_dir: str = CHECKPOINT_DIR
    """Where the aggregator writes its per-round checkpoint."""

    output_dir: str = OUTPUT_DIR
    """Where the aggregator writes the final model and ``history.json``."""

    @property
    def tls_folder(self) -> str | None:
        """:attr:`tls_dir`, or None for plaintext: only when the job says so
        (``spec.security.tls.mode: Disabled``), never because a setting is missing."""
        return None if self.spec.security.tls.mode == "Disabled" else self.tls_dir

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

    @classmethod
    def from_file(cls, path: str | Path) -> RuntimeConfig:
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text()))
        except ValidationError as error:
            # The operator wrote this file: a mismatch means its version differs from ours.
            raise ConfigurationError(
                f"{path} is not a RuntimeConfig this fedkube {version('fedkube')} reads "
                f"({error.error_count()} problems, first: {_first_problem(error)}); run the "
                "operator and the runtime image of the same fedkube version") from None


def _first_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"


AggregatorPhase = Literal["Waiting", "Running", "Succeeded", "Failed"]
"""Waiting for clients, running rounds, or finished."""


class AggregatorReport(ApiModel):
    """What the aggregator says of itself on ``GET /status``."""

    phase: AggregatorPhase
    """Waiting for clients, running rounds, or finished."""

    round: int = Field(ge=0)
    """Rounds completed."""

    rounds: int = Field(ge=0)
    """Rounds asked for."""

    clients_connected: int = Field(ge=0)
    """Clients currently joined."""

    metrics: JobMetrics = Field(default_factory=JobMetrics)
    """Global model evaluation after the latest round."""

    message: str = ""
    """Why the aggregator is in this phase (e.g. the error that failed it)."""
