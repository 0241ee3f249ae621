"""PyTorch Lightning in one line: ``flare.patch(trainer)`` (``pip install 'fedctl[lightning]'``).

::

    trainer = L.Trainer(max_epochs=1, ...)          # max_epochs: epochs *per round*
    flare.patch(trainer)
    while flare.is_running():
        trainer.validate(model, datamodule=dm)      # the received global model's metrics
        trainer.fit(model, datamodule=dm)           # trains from it and sends the result

What the patched trainer does at each task (the task the script is working on, taken by
``flare.is_running()``; a call made when there is none takes the first):

* **train**: ``validate`` and ``test`` load the received global weights and record their
  metrics; ``fit`` loads them too (unless a call of this task already did), runs
  ``max_epochs`` more epochs (or ``max_steps`` more steps), keeps the site's model
  (``flare.keep_local_model``) and sends it with the metrics — those of ``validate``/``test``
  when the script called one before ``fit`` (they describe the global model, which is what
  picks the best model), else the ones logged during ``fit`` — and
  ``NUM_STEPS_CURRENT_ROUND`` = the optimizer steps it took, the aggregation weight;
* **evaluate** (federated or cross-site evaluation): ``validate`` or ``test`` loads the model,
  runs, and sends its metrics with ``NUM_SAMPLES`` = the samples it evaluated; ``fit`` does not
  train;
* **submit_model** (cross-site evaluation): any patched call sends the site's own last model.

Once the task is answered, the calls run as if unpatched. Under SCAFFOLD the patch applies the
control-variate correction before each optimizer step and sends ``Δc_i`` (``flare.Scaffold``);
personalization recipes keep their local layers (``flare.personalize``); for FedProx add
``flare.proximal_term(self, flare.receive())`` to the loss in ``training_step``. Metrics the
module logs with ``self.log`` also stream to the server's sinks (TensorBoard, MLflow) unless
``log_metrics=False``. Works with ``lightning.pytorch`` and ``pytorch_lightning`` trainers.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any

from fedctl.client import api
from fedctl.codec.keys import NUM_SAMPLES_KEY
from fedctl.codec.model import NUM_STEPS_KEY, TASK_EVALUATE, TASK_SUBMIT_MODEL, TASK_TRAIN, FLModel
from fedctl.errors import ClientAPIError

INSTALL = "flare.patch() needs PyTorch Lightning: pip install 'fedctl[lightning]'"
#: site-state key: optimizer steps this site's trainers took in earlier rounds
STEP_KEY = "lightning.global_step"


def _package(trainer: Any) -> str:
    """``lightning.pytorch`` or ``pytorch_lightning``: the package of ``trainer``'s class."""
    module = type(trainer).__module__
    for pkg in ("lightning.pytorch", "pytorch_lightning"):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    raise ClientAPIError(
        f"flare.patch() takes a Lightning Trainer, got {type(trainer).__module__}."
        f"{type(trainer).__name__}"
    )


def _floats(metrics: Any) -> dict[str, float]:
    """One-number entries of a metrics mapping (tensors included) as floats."""
    out: dict[str, float] = {}
    for k, v in dict(metrics or {}).items():
        if hasattr(v, "numel") and callable(v.numel):
            if v.numel() != 1:
                continue
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[str(k)] = float(v)
    return out


class _Patch:
    """The state of one patched trainer across tasks."""

    def __init__(self, trainer: Any, pkg: str) -> None:
        self.trainer = trainer
        self.pkg = pkg
        self.epochs = trainer.max_epochs if trainer.max_epochs is not None else None
        self.steps = trainer.max_steps if trainer.max_steps not in (None, -1) else None
        if self.epochs in (None, -1) and self.steps is None:
            raise ClientAPIError(
                "flare.patch(): give the Trainer max_epochs (or max_steps): each round trains "
                "that much"
            )
        self.loaded: tuple[str, int] | None = None  # (task id, id(module)) whose weights are in
        self.pz: Any = None  # the Personalization of the loaded task
        self.eval_metrics: dict[str, dict[str, float]] = {}  # task id → validate/test metrics
        self.samples = 0  # samples seen by the running validate/test
        self.scaffold: Any = None
        #: the loop limits the Trainer was made with (each round's fit runs them again)
        self.limits = (trainer.min_epochs, trainer.max_epochs, trainer.min_steps, trainer.max_steps)
        # optimizer steps of this site's earlier rounds (also those of earlier trainers, when
        # the simulator runs the script afresh each round): logged steps keep growing
        previous = api.get_state().get(STEP_KEY, 0)
        self.step_base = previous if isinstance(previous, int) else 0

    # ------------------------------------------------------------------ the task

    def task(self) -> Any:
        """The task to act on: the current unanswered one (the first one if none was taken
        yet), or None (the job is over, or the task is answered: run unpatched)."""
        ch = api._channel("flare.patch")
        if ch.task is None and not ch.finished:
            api.receive()
        if ch.task is None or ch.answered:
            return None
        return ch.task

    def load(self, task: Any, module: Any) -> None:
        """The task's weights into ``module`` (once per task and module)."""
        from fedctl.client.personalization import personalize

        if self.loaded == (task.task_id, id(module)):
            return
        received = task.model
        if received.params is None:
            raise ClientAPIError(f"flare.patch(): the {task.name} task carries no model")
        self.pz = personalize(module, received)
        self.loaded = (task.task_id, id(module))

    def submit_local(self) -> None:
        from fedctl.client.evaluation import local_model

        params = local_model()
        if params is None:
            raise ClientAPIError(
                "flare.patch(): a submit_model task came before this site trained (no local "
                "model kept)"
            )
        api.send(FLModel(params=params))

    # ------------------------------------------------------------------ wrapped calls

    def fit(self, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        task = self.task()
        if task is None:
            return original(*args, **kwargs)
        if task.name == TASK_SUBMIT_MODEL:
            return self.submit_local()
        if task.name != TASK_TRAIN:
            return None  # an evaluation task: validate/test answer it, fit does not train
        module = kwargs.get("model", args[0] if args else None)
        self.load(task, module)
        t = self.trainer
        if t.global_step or t.current_epoch:  # a loop that could not be reset: extend it
            if self.epochs not in (None, -1):
                t.fit_loop.max_epochs = t.current_epoch + self.epochs
            if self.steps is not None:
                t.fit_loop.epoch_loop.max_steps = t.global_step + self.steps
        start = t.global_step
        self.scaffold = None
        try:
            out = original(*args, **kwargs)
        finally:
            scaffold, self.scaffold = self.scaffold, None
        if t.interrupted:
            raise ClientAPIError("flare.patch(): fit was interrupted; no result is sent")
        total = self.step_base + t.global_step
        api.get_state()[STEP_KEY] = total  # before send(), which saves the site state
        self.send_trained(task, module, t.global_step - start, scaffold)
        if self.reset_loop():
            self.step_base = total
        return out

    def reset_loop(self) -> bool:
        """Give the trainer a new fit loop, as a new Trainer has: the next round's ``fit`` then
        runs exactly as it would in a script started afresh (the simulator's per-round mode):
        same epochs, same data-loader iterators, same random draws. False if this Lightning
        version's loops cannot be rebuilt (the loop is then extended each round instead)."""
        t = self.trainer
        try:
            fit_loop = importlib.import_module(self.pkg + ".loops.fit_loop")
            epoch_loop = importlib.import_module(self.pkg + ".loops.training_epoch_loop")
            min_epochs, max_epochs, min_steps, max_steps = self.limits
            loop = fit_loop._FitLoop(t, min_epochs=min_epochs, max_epochs=max_epochs)
            loop.epoch_loop = epoch_loop._TrainingEpochLoop(
                t, min_steps=min_steps, max_steps=max_steps
            )
        except (ImportError, AttributeError, TypeError):
            return False
        t.fit_loop = loop
        return True

    def send_trained(self, task: Any, module: Any, steps: int, scaffold: Any) -> None:
        from fedctl.client.evaluation import keep_local_model

        metrics = self.eval_metrics.pop(task.task_id, None)
        if metrics is None:
            metrics = _floats(self.trainer.callback_metrics)
        keep_local_model(module)
        params = {k: v.detach().cpu() for k, v in self.pz.shared().items()}
        model = FLModel(params=params, metrics=metrics, meta={NUM_STEPS_KEY: steps})
        if scaffold is not None:
            model = scaffold.update(model)
        api.send(model)

    def evaluate(self, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        task = self.task()
        if task is None:
            return original(*args, **kwargs)
        if task.name == TASK_SUBMIT_MODEL:
            self.submit_local()
            return []
        module = kwargs.get("model", args[0] if args else None)
        if module is None:
            raise ClientAPIError("flare.patch(): pass the model to validate()/test()")
        self.load(task, module)
        self.samples = 0
        out = original(*args, **kwargs)
        metrics: dict[str, float] = {}
        for part in out or []:
            metrics.update(_floats(part))
        if task.name == TASK_EVALUATE:
            api.send(FLModel(metrics=metrics, meta={NUM_SAMPLES_KEY: self.samples}))
        else:
            self.eval_metrics.setdefault(task.task_id, {}).update(metrics)
        return out

    # ------------------------------------------------------------------ callback hooks

    def train_started(self, module: Any) -> None:
        from fedctl.client.scaffold import Scaffold

        task = self.task()
        if task is None or task.name != TASK_TRAIN:
            return
        optimizers = list(self.trainer.optimizers)
        scaffold = Scaffold(module, task.model, optimizers[0] if optimizers else None)
        if scaffold.active:
            if len(optimizers) != 1:
                raise ClientAPIError("flare.patch(): SCAFFOLD needs exactly one optimizer")
            self.scaffold = scaffold

    def before_step(self) -> None:
        if self.scaffold is not None:
            self.scaffold.correct()


@functools.cache
def _classes(pkg: str) -> tuple[type, type]:
    """The Callback and Logger subclasses for Lightning package ``pkg`` (imported here)."""
    lightning = importlib.import_module(pkg)
    loggers = importlib.import_module(pkg + ".loggers")
    from_data = importlib.import_module(pkg + ".utilities.data")
    base_callback: Any = lightning.Callback
    base_logger: Any = loggers.Logger

    class FedctlCallback(base_callback):
        """Hooks of the patch: SCAFFOLD's correction, evaluation sample counts."""

        def __init__(self, patch: _Patch) -> None:
            super().__init__()
            self.patch = patch

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.patch.train_started(pl_module)

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            self.patch.before_step()

        def _count(self, batch: Any) -> None:
            try:
                self.patch.samples += int(from_data.extract_batch_size(batch))
            except Exception:  # a batch whose size Lightning cannot tell: counted as 1
                self.patch.samples += 1

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if not trainer.sanity_checking:
                self._count(args[1])

        def on_test_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            self._count(args[1])

    class FedctlLogger(base_logger):
        """A Lightning logger that streams ``self.log`` metrics to the server's sinks."""

        def __init__(self, patch: _Patch) -> None:
            super().__init__()
            self.patch = patch

        @property
        def name(self) -> str:
            return "fedctl"

        @property
        def version(self) -> str:
            return "0"

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            """Hyper-parameters are the recipe's: nothing to send."""

        def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
            from fedctl.client.tracking import SummaryWriter

            writer = SummaryWriter()
            if step is not None:
                step += self.patch.step_base
            for key, value in _floats(metrics).items():
                if key != "epoch" and math.isfinite(value):
                    writer.add_scalar(key, value, step)

    return FedctlCallback, FedctlLogger


def patch(trainer: Any, *, log_metrics: bool = True) -> Any:
    """Make ``trainer`` federated (see the module docstring); returns it. Calls
    ``flare.init()``. Patching a trainer twice does nothing more."""
    try:
        pkg = _package(trainer)
        callback_cls, logger_cls = _classes(pkg)
    except ImportError:
        raise ClientAPIError(INSTALL) from None
    if getattr(trainer, "_fedctl_patch", None) is not None:
        return trainer
    api.init()
    state = _Patch(trainer, pkg)
    trainer.callbacks.append(callback_cls(state))
    if log_metrics:
        trainer.loggers = [*trainer.loggers, logger_cls(state)]
    fit, validate, test = trainer.fit, trainer.validate, trainer.test

    @functools.wraps(fit)
    def patched_fit(*args: Any, **kwargs: Any) -> Any:
        return state.fit(fit, args, kwargs)

    @functools.wraps(validate)
    def patched_validate(*args: Any, **kwargs: Any) -> Any:
        return state.evaluate(validate, args, kwargs)

    @functools.wraps(test)
    def patched_test(*args: Any, **kwargs: Any) -> Any:
        return state.evaluate(test, args, kwargs)

    trainer.fit, trainer.validate, trainer.test = patched_fit, patched_validate, patched_test
    trainer._fedctl_patch = state
    return trainer
