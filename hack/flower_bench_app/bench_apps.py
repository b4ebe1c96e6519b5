"""The Flower side of ``hack/bench_whole_round.py``: a ServerApp and a ClientApp.

The ServerApp runs Flower's own message-API FedAvg (``flwr.serverapp.strategy.FedAvg``) on
a model of ``layers`` dense layers (a ``width x width`` weight and a ``width`` bias each,
float32, the shapes of the fedkube side's ``torch.nn.Linear`` layers), every node trains
every round, and there is no federated or central evaluation. The ClientApp does no
training: it returns the arrays it received plus a constant, with a fixed example count.

The ServerApp appends the wall-clock (``time.time()``) start and end of each round to the
JSON file named by the run config's ``timings``: a round starts when FedAvg is asked to
configure it (before it samples the nodes) and ends when its aggregate exists.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

NUM_EXAMPLES = 10
"""Every client's example count (the FedAvg weight)."""

server = ServerApp()
client = ClientApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts and ends."""

    def __init__(self, timings: Path, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.timings = timings
        self.rounds: list[dict[str, float]] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.rounds.append({"round": server_round, "start": time.time()})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        self.rounds[-1]["end"] = time.time()
        partial = self.timings.with_suffix(".partial")
        partial.write_text(json.dumps(self.rounds))
        os.replace(partial, self.timings)  # whole, for the benchmark polling it
        return result


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    width, layers, clients = (int(config[key]) for key in ("width", "layers", "num-clients"))
    rng = np.random.default_rng(0)
    initial = []
    for _ in range(layers):
        initial.append(rng.standard_normal((width, width), dtype=np.float32))
        initial.append(rng.standard_normal(width, dtype=np.float32))
    strategy = TimedFedAvg(Path(str(config["timings"])), fraction_train=1.0,
                           fraction_evaluate=0.0, min_train_nodes=clients,
                           min_available_nodes=clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial),
                   num_rounds=int(config["num-server-rounds"]))


@client.train()
def train(msg: Message, context: Context) -> Message:
    """No training: the received arrays plus a constant."""
    arrays = [array + 0.001 for array in msg.content["arrays"].to_numpy_ndarrays()]
    return Message(RecordDict({"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"num-examples": NUM_EXAMPLES})}),
                   reply_to=msg)
