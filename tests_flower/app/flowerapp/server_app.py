"""flowerapp: a Flower ServerApp with Flower's FedAvg or a custom strategy."""

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flowerapp.task import Net

app = ServerApp()


class DampedFedAvg(FedAvg):
    """A custom strategy: FedAvg whose new model moves only half way from the old one."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, object]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.previous is not None:
            new, old = arrays.to_torch_state_dict(), self.previous.to_torch_state_dict()
            arrays = ArrayRecord({k: (new[k] + old[k]) / 2 for k in new})
        self.previous = arrays
        return arrays, metrics

    def configure_train(self, server_round, arrays, config, grid):
        self.previous = arrays
        return super().configure_train(server_round, arrays, config, grid)


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    rounds = int(context.run_config["num-server-rounds"])
    kind = DampedFedAvg if context.run_config["strategy"] == "damped" else FedAvg
    strategy = kind(fraction_train=float(context.run_config["fraction-train"]))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        train_config=ConfigRecord({"lr": float(context.run_config["lr"])}),
        num_rounds=rounds,
    )
    from safetensors.torch import save_file

    save_file(result.arrays.to_torch_state_dict(), str(context.run_config["out"]))
