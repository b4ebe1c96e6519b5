"""Strategies against straightforward float64 references, on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedkube.federation import transport
from fedkube.federation.spill import SpillFile
from fedkube.federation.strategies import UpdateRejected, build_strategy
from fedkube.federation.strategies.base import MeanFold, StackFold

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = {"w": (3, 4), "b": (4,)}


def make_state(rng: np.random.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(rng.normal(0, scale, s)).float() for k, s in SHAPES.items()}


def flat64(state: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.double().numpy().ravel() for t in state.values()])


def aggregate(name: str, glob, updates, weights, **params):
    strategy = build_strategy(name, **params)
    agg = strategy.new_round(glob, len(updates))
    for update, n in zip(updates, weights, strict=True):
        agg.add(update, n)
    assert agg.count == len(updates)
    return flat64(agg.result())


cases = st.tuples(
    st.integers(0, 2**31 - 1), st.integers(1, 9), st.lists(st.integers(1, 50), min_size=9)
)


def inputs(seed: int, n: int):
    rng = np.random.default_rng(seed)
    glob = make_state(rng)
    return glob, [make_state(rng) for _ in range(n)]


@FAST
@given(cases, st.sampled_from(["fedavg", "fedprox"]))
def test_fedavg_is_the_example_weighted_mean(case, name):
    seed, n, weights = case
    glob, updates = inputs(seed, n)
    expected = np.average([flat64(u) for u in updates], axis=0, weights=weights[:n])
    got = aggregate(name, glob, updates, weights[:n])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def reference_server_opt(name, glob, rounds, lr, beta1, beta2, tau, momentum):
    x = flat64(glob)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for updates, weights in rounds:
        delta = np.average([flat64(u) for u in updates], axis=0, weights=weights) - x
        if name == "fedavgm":
            m = momentum * m + delta
            x = x + lr * m
            continue
        if name == "fedadagrad":
            m, v = delta, v + delta**2
        else:
            m = beta1 * m + (1 - beta1) * delta
            if name == "fedadam":
                v = beta2 * v + (1 - beta2) * delta**2
            else:
                v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@FAST
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["fedavgm", "fedadam", "fedyogi", "fedadagrad"]),
    st.floats(0.05, 1.0),
)
def test_server_optimizers_match_reference_over_rounds(seed, name, lr):
    rng = np.random.default_rng(seed)
    glob = make_state(rng)
    params = dict(beta1=0.9, beta2=0.99, tau=0.1, server_momentum=0.8)
    strategy = build_strategy(name, server_learning_rate=lr, **params)
    rounds, state = [], glob
    for _ in range(3):
        updates = [{k: v + make_state(rng, 0.1)[k] for k, v in state.items()} for _ in range(3)]
        weights = [int(w) for w in rng.integers(1, 20, 3)]
        rounds.append((updates, weights))
        agg = strategy.new_round(state, 3)
        for u, w in zip(updates, weights, strict=True):
            agg.add(u, w)
        state = agg.result()
    expected = reference_server_opt(
        name, glob, rounds, lr, 0.9, 0.99, 0.1, 0.8
    )
    np.testing.assert_allclose(flat64(state), expected, atol=1e-4, rtol=1e-4)


@FAST
@given(cases, st.floats(0.0, 0.49))
def test_median_and_trimmed_mean_are_coordinatewise(case, trim):
    seed, n, weights = case
    glob, updates = inputs(seed, n)
    stacked = np.stack([flat64(u) for u in updates])
    np.testing.assert_allclose(
        aggregate("fedmedian", glob, updates, weights[:n]), np.median(stacked, axis=0), atol=1e-5
    )
    cut = int(trim * n)
    trimmed = np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0)
    got = aggregate("trimmedmean", glob, updates, weights[:n], trim_fraction=trim)
    np.testing.assert_allclose(got, trimmed, atol=1e-5)


@pytest.mark.parametrize("n", [1, 6, 7])
def test_coordinatewise_strategies_span_many_column_slices(n):
    # ~10 slices of columns with a partial last one; rounded values make ties common.
    rng = np.random.default_rng(n)
    size = 10 * (1 << 18) // n + 123
    glob = {"w": torch.zeros(size)}
    updates = [{"w": torch.from_numpy(rng.normal(0, 1, size).round(1)).float()}
               for _ in range(n)]
    stacked = np.stack([u["w"].double().numpy() for u in updates])
    np.testing.assert_allclose(aggregate("fedmedian", glob, updates, [1] * n),
                               np.median(stacked, axis=0), atol=1e-6)
    cut = int(0.3 * n)
    np.testing.assert_allclose(
        aggregate("trimmedmean", glob, updates, [1] * n, trim_fraction=0.3),
        np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0), atol=1e-6)


def reference_krum_scores(stacked: np.ndarray, f: int) -> np.ndarray:
    n = len(stacked)
    closest = max(1, n - f - 2)
    d = ((stacked[:, None, :] - stacked[None, :, :]) ** 2).sum(axis=2)
    return np.array([np.sort(np.delete(d[i], i))[:closest].sum() for i in range(n)])


@FAST
@given(cases, st.integers(0, 3), st.integers(1, 9))
def test_krum_and_multikrum_select_the_best_scored(case, f, m):
    seed, n, weights = case
    assume(n >= 2)
    m = min(m, n)
    glob, updates = inputs(seed, n)
    stacked = np.stack([flat64(u) for u in updates])
    scores = reference_krum_scores(stacked - flat64(glob), f)
    order = np.argsort(scores)
    # float32 scores may swap near-ties; compare only well-separated selections.
    assume(m == n or scores[order[m]] - scores[order[m - 1]] > 1e-3 * scores.max())
    assume(n == 1 or scores[order[1]] - scores[order[0]] > 1e-3 * scores.max())
    np.testing.assert_allclose(
        aggregate("krum", glob, updates, weights[:n], byzantine_clients=f),
        stacked[order[0]],
        atol=1e-5,
    )
    got = aggregate("multikrum", glob, updates, weights[:n], byzantine_clients=f, krum_select=m)
    np.testing.assert_allclose(got, stacked[order[:m]].mean(axis=0), atol=1e-5)


def test_krum_rejects_an_outlier():
    rng = np.random.default_rng(0)
    glob = make_state(rng)
    honest = [{k: v + make_state(rng, 0.01)[k] for k, v in glob.items()} for _ in range(6)]
    poisoned = {k: v + 100.0 for k, v in glob.items()}
    got = aggregate("multikrum", glob, [*honest, poisoned], [1] * 7, byzantine_clients=1)
    assert np.abs(got - flat64(glob)).max() < 0.1


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (lambda g: {**g, "w": torch.full((3, 4), float("nan"))}, "NaN"),
        (lambda g: {**g, "b": torch.tensor([1.0, float("inf"), 0.0, 0.0])}, "infinite"),
        (lambda g: {**g, "w": torch.zeros(4, 3)}, "shape"),
        (lambda g: {"w": g["w"]}, "missing tensors: b"),
        (lambda g: {**g, "extra": torch.zeros(1)}, "unexpected tensors: extra"),
        (lambda g: {**g, "b": torch.zeros(4, dtype=torch.int64)}, "dtype"),
    ],
)
@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
def test_bad_updates_are_rejected_and_leave_the_round_untouched(update, reason, name):
    rng = np.random.default_rng(1)
    glob, good = make_state(rng), make_state(rng)
    agg = build_strategy(name).new_round(glob, 3)
    agg.add(good, 10)
    with pytest.raises(UpdateRejected, match=reason):
        agg.add(update(glob), 10)
    assert agg.count == 1
    np.testing.assert_allclose(flat64(agg.result()), flat64(good), atol=1e-6)


def test_num_examples_must_be_positive():
    glob = make_state(np.random.default_rng(2))
    agg = build_strategy("fedavg").new_round(glob, 2)
    with pytest.raises(UpdateRejected, match="at least 1"):
        agg.add(glob, 0)
    assert agg.count == 0


def test_non_floating_tensors_take_the_maximum():
    glob = {"w": torch.zeros(2), "num_batches_tracked": torch.tensor(5)}
    agg = build_strategy("fedavg").new_round(glob, 2)
    agg.add({"w": torch.ones(2), "num_batches_tracked": torch.tensor(9)}, 1)
    agg.add({"w": torch.ones(2), "num_batches_tracked": torch.tensor(7)}, 1)
    result = agg.result()
    assert result["num_batches_tracked"].item() == 9
    assert result["num_batches_tracked"].dtype == torch.int64


def test_state_dict_round_trip_resumes_identically(tmp_path):
    rng = np.random.default_rng(3)
    glob = make_state(rng)
    rounds = [[make_state(rng) for _ in range(2)] for _ in range(3)]

    def run(strategy, state, batches):
        for updates in batches:
            agg = strategy.new_round(state, 2)
            for u in updates:
                agg.add(u, 5)
            state = agg.result()
        return state

    params = dict(clip_norm=1.0, noise_multiplier=0.5, seed=7)
    straight = run(build_strategy("fedadam", **params), glob, rounds)
    first = build_strategy("fedadam", **params)
    middle = run(first, glob, rounds[:2])
    torch.save(first.state_dict(), tmp_path / "s.pt")
    resumed = build_strategy("fedadam", **{**params, "seed": 99})
    resumed.load_state_dict(torch.load(tmp_path / "s.pt"))
    np.testing.assert_array_equal(flat64(run(resumed, middle, rounds[2:])), flat64(straight))
    with pytest.raises(ValueError, match="fedadam"):
        build_strategy("fedyogi").load_state_dict(first.state_dict())


def test_clipping_bounds_each_update_delta():
    rng = np.random.default_rng(4)
    glob = make_state(rng)
    far = {k: v + 50.0 for k, v in glob.items()}
    got = aggregate("fedavg", glob, [far], [1], clip_norm=2.0)
    assert np.linalg.norm(got - flat64(glob)) == pytest.approx(2.0, rel=1e-5)
    near = {k: v + 1e-3 for k, v in glob.items()}
    got = aggregate("fedavg", glob, [near], [1], clip_norm=2.0)
    np.testing.assert_allclose(got, flat64(near), atol=1e-6)


def test_noise_is_reproducible_by_seed_and_has_the_stated_scale():
    glob = {"w": torch.zeros(20_000)}
    updates = [{"w": torch.zeros(20_000)} for _ in range(4)]

    def noisy(seed):
        return aggregate("fedavg", glob, updates, [1] * 4, clip_norm=1.0,
                         noise_multiplier=2.0, seed=seed)

    np.testing.assert_array_equal(noisy(1), noisy(1))
    assert not np.array_equal(noisy(1), noisy(2))
    # Noise N(0, (z*C)^2) on the sum of 4 deltas, then divided by 4.
    assert noisy(1).std() == pytest.approx(2.0 / 4, rel=0.05)


def test_build_strategy_errors_name_the_field():
    with pytest.raises(ValueError, match=r"spec.strategy.name"):
        build_strategy("fedsgd")
    with pytest.raises(TypeError, match="trim"):
        build_strategy("trimmedmean", trim=0.1)
    with pytest.raises(ValueError, match="clipNorm"):
        build_strategy("fedavg", noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"trim_fraction|trimFraction"):
        build_strategy("trimmedmean", trim_fraction=0.7)
    assert build_strategy("fedprox", proximal_mu=0.5).proximal_mu == 0.5
    assert build_strategy("fedavg").proximal_mu == 0.0


def test_build_strategy_from_spec_maps_strategy_and_privacy():
    from fedkube.api import FederatedJobSpec
    from fedkube.federation.strategies import build_strategy_from_spec

    spec = FederatedJobSpec.model_validate({
        "strategy": {"name": "fedavgm", "params": {"serverMomentum": 0.5}},
        "privacy": {"clipNorm": 3.0},
    })
    strategy = build_strategy_from_spec(spec)
    assert (strategy.name, strategy.momentum, strategy.learning_rate) == ("fedavgm", 0.5, 1.0)
    assert strategy.clip_norm == 3.0


def test_fedavg_accumulator_does_not_grow_with_clients():
    glob = {"w": torch.zeros(100_000)}

    def held_bytes(clients):
        agg = build_strategy("fedavg").new_round(glob, clients)
        for _ in range(clients):
            agg.add({"w": torch.ones(100_000)}, 1)
        fold = agg._fold
        assert isinstance(fold, MeanFold)
        return sum(
            t.numel() * t.element_size() for t in vars(fold).values() if isinstance(t, torch.Tensor)
        )

    assert held_bytes(50) == held_bytes(5) == 4 * 100_000


@pytest.mark.parametrize(("name", "params"), [
    ("fedmedian", {}), ("trimmedmean", {"trim_fraction": 0.2}),
    ("krum", {"byzantine_clients": 1}), ("multikrum", {"byzantine_clients": 1})])
def test_a_stack_beyond_its_memory_limit_is_mapped_from_a_file_with_the_same_result(name, params):
    """Both folds run the same operations on the same values: bit-identical results."""
    glob, updates = inputs(7, 6)
    stack_bytes = 6 * 16 * 4

    def run(limit):
        agg = build_strategy(name, stack_memory_bytes=limit, **params).new_round(glob, 6)
        for update in updates:
            agg.add(update, 10)
        fold = agg._fold
        assert isinstance(fold, StackFold)
        return fold, flat64(agg.result())

    in_memory, expected = run(stack_bytes)
    mapped, got = run(stack_bytes - 1)
    assert (in_memory.mapped, mapped.mapped) == (False, True)
    np.testing.assert_array_equal(got, expected)


def test_the_stack_memory_limit_comes_from_the_aggregator_spec():
    from fedkube.api import FederatedJobSpec
    from fedkube.federation.strategies import build_strategy_from_spec

    spec = FederatedJobSpec.model_validate({"aggregator": {"stackMemory": "3Mi"}})
    assert build_strategy_from_spec(spec).stack_memory_bytes == 3 << 20
    default = build_strategy_from_spec(FederatedJobSpec.model_validate({}))
    assert default.stack_memory_bytes == 2 << 30


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["fedavg", "fedmedian", "fedadam"])
def test_strategy_on_cuda_matches_cpu(name):
    rng = np.random.default_rng(5)
    glob = make_state(rng)
    updates = [make_state(rng) for _ in range(4)]
    on_cpu = aggregate(name, glob, updates, [1, 2, 3, 4])
    strategy = build_strategy(name, device="cuda")
    agg = strategy.new_round(glob, 4)
    for u, n in zip(updates, [1, 2, 3, 4], strict=True):
        agg.add(u, n)
    result = agg.result()
    assert all(t.is_cuda for t in result.values())
    np.testing.assert_allclose(flat64({k: v.cpu() for k, v in result.items()}), on_cpu, atol=1e-5)


def test_values_overflowing_float32_are_rejected():
    glob = {"w": torch.zeros(3)}
    agg = build_strategy("fedavg").new_round(glob, 1)
    with pytest.raises(UpdateRejected, match="infinite"):
        agg.add({"w": torch.tensor([1e300, 0.0, 0.0], dtype=torch.float64)}, 1)
    assert agg.count == 0


def test_stacked_round_rejects_more_updates_than_sampled():
    glob = {"w": torch.zeros(3)}
    agg = build_strategy("krum").new_round(glob, 1)
    agg.add({"w": torch.ones(3)}, 1)
    with pytest.raises(UpdateRejected, match="sampled updates"):
        agg.add({"w": torch.ones(3)}, 1)
    assert agg.count == 1


SPILL = SpillFile()


def _wire_update(agg, state: dict[str, torch.Tensor], chunk: int, spill_every: int = 0):
    """``state`` fed to a reader as the wire carries it; every ``spill_every``-th chunk
    spilled to the reader's file."""
    wire = transport.encode(state)
    reader = agg.reader(transport.manifest(wire))
    for number, data in enumerate(transport.iter_chunks(wire, chunk)):
        reader.feed(data, SPILL if spill_every and number % spill_every == 0 else None)
    return reader


@FAST
@given(cases, st.sampled_from(["fedavg", "fedmedian", "krum"]), st.integers(1, 64),
       st.integers(0, 3))
def test_updates_folded_from_the_wire_equal_updates_added_whole(case, name, chunk, spill):
    seed, n, weights = case
    glob, updates = inputs(seed, n)
    wired = build_strategy(name, clip_norm=5.0).new_round(glob, n)
    for update, weight in zip(updates, weights, strict=False):
        with _wire_update(wired, update, chunk, spill).finish() as received:
            wired.accept(received, weight)
    whole = build_strategy(name, clip_norm=5.0).new_round(glob, n)
    for update, weight in zip(updates, weights, strict=False):
        whole.add(update, weight)
    np.testing.assert_array_equal(flat64(wired.result()), flat64(whole.result()))
    assert SPILL.size == 0, "a folded update left its regions in the spill file"


@pytest.mark.parametrize("spill", [0, 1])
def test_nan_in_the_last_chunk_rejects_the_update_before_it_touches_the_round(spill):
    rng = np.random.default_rng(6)
    glob, good, bad = make_state(rng), make_state(rng), make_state(rng)
    bad["b"][-1] = float("nan")
    agg = build_strategy("fedavg").new_round(glob, 2)
    agg.add(good, 3)
    with pytest.raises(UpdateRejected, match="NaN"):
        _wire_update(agg, bad, chunk=8, spill_every=spill)
    short = _wire_update(agg, good, chunk=8)
    with pytest.raises(UpdateRejected, match="stream ended"):
        _incomplete(agg, good).finish()
    assert short.finish() is not None and agg.count == 1
    np.testing.assert_allclose(flat64(agg.result()), flat64(good), atol=1e-6)


def _incomplete(agg, state):
    wire = transport.encode(state)
    reader = agg.reader(transport.manifest(wire))
    reader.feed(next(transport.iter_chunks(wire, 8)))
    return reader


@pytest.mark.parametrize("buffer_bytes", [16, 40, 1 << 20])
def test_spilled_pieces_come_back_whole_whatever_the_read_buffer(buffer_bytes):
    """A fold takes an update a batch at a time; spilled pieces share one read buffer, so a
    batch ends wherever the next spilled piece would overwrite the values it holds."""
    rng = np.random.default_rng(9)
    glob, update = make_state(rng), make_state(rng)
    agg = build_strategy("fedavg").new_round(glob, 1)
    with _wire_update(agg, update, chunk=12, spill_every=2).finish() as received:
        batches = [[(span.key, start, values.clone()) for span, start, values in batch]
                   for batch in received.batches(buffer_bytes)]
    rebuilt = {key: torch.full((tensor.numel(),), float("nan")) for key, tensor in update.items()}
    for key, start, values in [piece for batch in batches for piece in batch]:
        rebuilt[key][start:start + values.numel()] = values
    for key, tensor in update.items():
        np.testing.assert_array_equal(rebuilt[key].numpy(), tensor.reshape(-1).numpy())
    assert (len(batches) > 1) == (buffer_bytes < 1 << 20)


def test_a_manifest_unlike_the_global_model_is_refused_before_any_byte():
    glob = make_state(np.random.default_rng(7))
    agg = build_strategy("fedavg").new_round(glob, 1)
    metas = transport.manifest(transport.encode(glob))
    with pytest.raises(UpdateRejected, match="missing tensors: b"):
        agg.reader(metas[:1])
    with pytest.raises(UpdateRejected, match="shape"):
        agg.reader([transport.TensorMeta("w", "float32", (4, 3)), metas[1]])
    with pytest.raises(UpdateRejected, match="order"):
        agg.reader(metas[::-1])


def test_fedavg_in_another_order_stays_within_the_float32_bound():
    """Float addition does not associate (and torch fuses multiply and add), so the fold
    order changes the last bits: within n * 2^-24 of the summed magnitudes over the total
    weight. The aggregator folds in client order, whatever the arrival order, to be exact."""
    rng = np.random.default_rng(8)
    glob = make_state(rng)
    updates = [make_state(rng, scale=100.0) for _ in range(6)]
    weights = [1, 7, 3, 50, 2, 9]

    def folded(order):
        agg = build_strategy("fedavg").new_round(glob, len(order))
        for i in order:
            agg.add(updates[i], weights[i])
        return flat64(agg.result())

    reference = folded(range(6))
    np.testing.assert_array_equal(folded(range(6)), reference)
    magnitude = sum(w * np.abs(flat64(u)) for u, w in zip(updates, weights, strict=True))
    bound = (len(updates) + 2) * 2.0**-24 * (magnitude / sum(weights) + np.abs(reference))
    for order in ([5, 4, 3, 2, 1, 0], [3, 0, 5, 1, 4, 2]):
        assert np.all(np.abs(folded(order) - reference) <= bound)


def test_the_spill_file_gives_back_what_was_folded_and_starts_over():
    spill = SpillFile()
    first, second = spill.write(b"a" * 100), spill.write(b"b" * 50)
    assert (first, second, spill.size) == (0, 100, 150)
    buffer = bytearray(50)
    spill.read_into(memoryview(buffer), second)
    assert bytes(buffer) == b"b" * 50
    spill.release(first, 100)
    assert spill.size == 50
    spill.release(second, 50)
    assert spill.size == 0 and spill.write(b"c") == 0  # the file started over
    spill.close()
