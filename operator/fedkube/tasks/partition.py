"""Splitting a labelled training set among clients, reproducibly by seed."""

from __future__ import annotations

import numpy as np

from fedkube.api import PartitioningSpec
from fedkube.api.runtime import ConfigurationError


def partition(labels: np.ndarray, num_clients: int, spec: PartitioningSpec) -> list[np.ndarray]:
    """Sorted sample indices of each client: disjoint, covering ``labels``, none empty.

    ``iid`` deals a random permutation out in near-equal parts. ``dirichlet`` draws each
    class's split among the clients from Dirichlet(alpha), so small alphas give each client a
    few dominant labels (Hsu et al. 2019); a client left empty takes one sample from the
    largest client.
    """
    if not 1 <= num_clients <= len(labels):
        raise ConfigurationError(
            f"cannot split {len(labels)} training samples among {num_clients} clients: "
            f"use between 1 and {len(labels)} clients.replicas"
        )
    rng = np.random.default_rng(spec.seed)
    if spec.scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    else:
        parts = _dirichlet(labels, num_clients, spec.alpha, rng)
    return [np.sort(part) for part in parts]


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, piece in enumerate(np.split(members, cuts)):
            shares[client].append(piece)
    parts = [np.concatenate(pieces) for pieces in shares]
    for client, part in enumerate(parts):
        if len(part) == 0:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            parts[client], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts
