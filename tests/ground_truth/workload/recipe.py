from model import initial_model

from fedctl.recipe import FedAvgRecipe

recipe = FedAvgRecipe(
    name="ground-truth",
    min_clients=2,
    num_rounds=3,
    model=initial_model(),
    train_script="client.py",
    key_metric=None,
)
