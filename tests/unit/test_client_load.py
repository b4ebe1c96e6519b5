"""A client loads the streamed global model into its own: in place where the stream matches
the model's tensors, through a reusable buffer where it does not."""

from __future__ import annotations

import pytest
import torch

from fedkube.federation import transport
from fedkube.federation.client import load_stream


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(9, 7)
        self.norm = torch.nn.BatchNorm1d(7)  # an int64 buffer among the float tensors


def _sent(model: torch.nn.Module, dtype: torch.dtype = torch.float32,
          ) -> tuple[dict[str, torch.Tensor], list[transport.TensorMeta], list[bytes]]:
    """Another model's state as the aggregator streams it, in chunks that cut elements."""
    generator = torch.Generator().manual_seed(1)
    state = {name: (torch.randn(t.shape, generator=generator) if t.is_floating_point()
                    else t + 5) for name, t in model.state_dict().items()}
    wire = transport.encode(state, dtype)
    return state, transport.manifest(wire), list(transport.iter_chunks(wire, 37))


def test_a_matching_stream_is_written_into_the_model_itself() -> None:
    model = _Model()
    where = {name: t.data_ptr() for name, t in model.state_dict().items()}
    state, metas, chunks = _sent(model)

    assert load_stream(model, metas, chunks, None) is None  # no buffer: no second model

    loaded = model.state_dict()
    assert {name: t.data_ptr() for name, t in loaded.items()} == where
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(model.linear.weight.detach(), state["linear.weight"])


def test_a_16_bit_stream_goes_through_a_buffer_that_is_reused() -> None:
    model = _Model()
    state, metas, chunks = _sent(model, torch.bfloat16)

    buffer = load_stream(model, metas, chunks, None)
    assert buffer is not None
    again = load_stream(model, metas, chunks, buffer)

    assert again is buffer
    loaded = model.state_dict()
    assert loaded["linear.weight"].dtype == torch.float32
    assert torch.equal(loaded["linear.weight"], state["linear.weight"].bfloat16().float())
    assert torch.equal(loaded["norm.num_batches_tracked"], state["norm.num_batches_tracked"])


def test_a_stream_for_another_model_is_refused() -> None:
    model = _Model()
    _, metas, chunks = _sent(torch.nn.Linear(9, 7))

    with pytest.raises(RuntimeError, match="Missing key"):
        load_stream(model, metas, chunks, None)


def test_a_stream_that_breaks_off_is_an_error() -> None:
    model = _Model()
    _, metas, chunks = _sent(model)

    with pytest.raises(transport.TransportError, match="stream ended after"):
        load_stream(model, metas, chunks[:-1], None)
