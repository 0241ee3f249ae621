"""The API training scripts import (``import fedctl.client as flare``).

A tiny public surface over a hidden runtime: the same script runs in the simulator, in POC and
in production, and as a plain ``python client.py`` for debugging.
"""

from fedctl.client import tracking  # flare.tracking.SummaryWriter
from fedctl.client.api import (
    get_job_id,
    get_num_sites,
    get_site_index,
    get_site_name,
    get_state,
    get_task_name,
    init,
    is_evaluate,
    is_running,
    is_submit_model,
    is_train,
    log,
    receive,
    send,
    system_info,
)
from fedctl.client.build import build_model
from fedctl.client.dp import PrivateTraining, make_private
from fedctl.client.evaluation import keep_local_model, local_model
from fedctl.client.fedprox import proximal_term
from fedctl.client.lightning import patch
from fedctl.client.personalization import Personalization, personalize
from fedctl.client.scaffold import Scaffold
from fedctl.codec.keys import NUM_SAMPLES_KEY
from fedctl.codec.model import NUM_STEPS_KEY, FLModel, ParamsType

__all__ = [
    "NUM_SAMPLES_KEY",
    "NUM_STEPS_KEY",
    "FLModel",
    "ParamsType",
    "Personalization",
    "PrivateTraining",
    "Scaffold",
    "build_model",
    "get_job_id",
    "get_num_sites",
    "get_site_index",
    "get_site_name",
    "get_state",
    "get_task_name",
    "init",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "keep_local_model",
    "local_model",
    "log",
    "make_private",
    "patch",
    "personalize",
    "proximal_term",
    "receive",
    "send",
    "system_info",
    "tracking",
]
