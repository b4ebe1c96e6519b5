"""Names that the CRD, the operator, the runtime and the chart all agree on."""

from typing import Final

GROUP: Final = "fedkube.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "fedkube.io/v1alpha1"  # GROUP/VERSION, spelled out for its Literal type
KIND: Final = "FederatedJob"
LIST_KIND: Final = "FederatedJobList"
PLURAL: Final = "federatedjobs"
SINGULAR: Final = "federatedjob"
SHORT_NAMES: Final = ("fedjob", "fj")
CATEGORIES: Final = ("all", "fedkube")
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

#: Labels that every child object carries; selectors and dashboards rely on them.
LABEL_JOB: Final = f"{GROUP}/job"
LABEL_ROLE: Final = f"{GROUP}/role"
LABEL_CLIENT_INDEX: Final = f"{GROUP}/client-index"
LABEL_SITE: Final = f"{GROUP}/site"

ROLE_AGGREGATOR: Final = "aggregator"
ROLE_CLIENT: Final = "client"

#: Longest job name that still leaves room for child suffixes such as ``-client-9999``
#: inside the 63-character DNS label that Services and Pods need.
MAX_JOB_NAME_LENGTH: Final = 45
