"""flowerapp: a Flower ClientApp."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerapp.task import Net, load_data, test, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    x, y = load_data(pid, int(context.node_config["num-partitions"]))
    server_round = int(msg.content["config"]["server-round"])
    loss = train(
        model,
        x,
        y,
        int(context.run_config["local-epochs"]),
        float(context.run_config["lr"]),
        seed=pid * 1000 + server_round,
    )
    # a counter kept in the node's state across rounds, as Flower apps do
    seen = context.state.get("seen", MetricRecord({"rounds": 0}))
    context.state["seen"] = MetricRecord({"rounds": int(seen["rounds"]) + 1})
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {
                    "train_loss": loss,
                    "num-examples": len(x),
                    "rounds-seen": int(context.state["seen"]["rounds"]),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    x, y = load_data(pid, int(context.node_config["num-partitions"]))
    loss, acc = test(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


__all__ = ["app", "torch"]
