"""Hybrid execution: client updates in the Python TF runtime (GPU if present), the rest in TFF.

TFF's pip `worker_binary` links no CUDA, so everything it executes runs on CPU. In hybrid mode
each site's local training -- the very `tf.function` that TFF's client work runs
(`client.build_client_update`, DP-SGD with its seeded noise included) -- runs eagerly in this
process, where TensorFlow places it on the GPU. Its result (the model delta, the update weight
and the metrics) enters TFF as a CLIENTS-placed value, and the aggregation (mean, secure sum or
`DifferentiallyPrivateFactory`: clipping, noise, adaptive clip) and the server optimizer step
run as TFF computations on the TFF runtime (`local_runtime()` / `remote_runtime()`).

`HybridProcess` has the `LearningProcess` interface (`initialize`, `next(state, client_data)`,
`get_model_weights`, `set_model_weights`) and the *same* state type: checkpoints and runs can
switch between the two paths. On CPU both give the same weights for the same seed (tested).

What changes for privacy: nothing for the math (same clip, noise, seeds, aggregation). Where
it runs: the client update sees the site's data in this process, so hybrid mode belongs on the
site's own machine (one process per site, or the single-machine simulation), never on a
coordinator that must not see the data.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_privseg.config import Config
from tff_privseg.errors import UserError
from tff_privseg.federated.client import build_client_update
from tff_privseg.privacy.dp_sgd import DpSgdSpec


def _server_step(
    cfg: Config, sites_per_round: int, process: tff.learning.templates.LearningProcess
) -> tff.Computation:
    """TFF computation: (state, client results) -> LearningProcessOutput, as `process.next`."""
    from tff_privseg.federated.process import build_server_processes

    state_type = process.next.type_signature.parameter[0]
    weights_type = state_type.member.global_model_weights
    trainable_type = weights_type.trainable
    aggregation, finalizer = build_server_processes(cfg, sites_per_round, weights_type)

    @tff.federated_computation(
        state_type,
        tff.FederatedType(trainable_type, tff.CLIENTS),
        tff.FederatedType(np.float32, tff.CLIENTS),
        tff.FederatedType(np.int64, tff.CLIENTS),
        tff.FederatedType(np.float32, tff.CLIENTS),
    )
    def server_step(state, updates, update_weights, examples, loss_sum):
        aggregated = aggregation.next(state.aggregator, updates, update_weights)
        finalized = finalizer.next(state.finalizer, state.global_model_weights, aggregated.result)
        new_state = tff.federated_zip(
            tff.learning.templates.LearningAlgorithmState(
                finalized.result,
                state.distributor,  # the broadcast process is stateless
                state.client_work,  # the round's client learning rate, set by the driver
                aggregated.state,
                finalized.state,
            )
        )
        train = collections.OrderedDict(
            examples=tff.federated_sum(examples), loss_sum=tff.federated_sum(loss_sum)
        )
        metrics = tff.federated_zip(
            collections.OrderedDict(
                distributor=tff.federated_value((), tff.SERVER),
                client_work=tff.federated_zip(train),
                aggregator=aggregated.measurements,
                finalizer=finalized.measurements,
            )
        )
        return tff.learning.templates.LearningProcessOutput(new_state, metrics)

    expected = process.next.type_signature.result
    if not expected.is_equivalent_to(server_step.type_signature.result):
        raise UserError(
            "hybrid mode is out of step with the TFF process (process.py changed?): "
            f"{server_step.type_signature.result} != {expected}"
        )
    return server_step


class HybridProcess:
    """`LearningProcess`-compatible; client work in Python TF, aggregation + server in TFF."""

    def __init__(
        self,
        cfg: Config,
        model_fn: Callable[[], tf.keras.Model],
        loss_fn: Callable,
        sites_per_round: int,
        dp_by_site: DpSgdSpec | None,
        process: tff.learning.templates.LearningProcess | None = None,
        device: str | None = None,
    ) -> None:
        from tff_privseg.federated.process import build_process, client_optimizer

        self.tff_process = process or build_process(
            cfg, model_fn, loss_fn, sites_per_round, dp_by_site
        )
        self.initialize = self.tff_process.initialize
        self.get_model_weights = self.tff_process.get_model_weights
        self.set_model_weights = self.tff_process.set_model_weights
        self.device = device or default_device()
        with tf.device(self.device):
            self._client_update = build_client_update(
                model_fn, loss_fn, client_optimizer(cfg), dp_by_site
            )
        self._by_examples = cfg.train.weighting == "examples"
        self._private = cfg.privacy.level != "none"
        self._server_step = _server_step(cfg, sites_per_round, self.tff_process)

    def client_update(self, weights: Sequence[np.ndarray], data: dict, lr: float) -> tuple:
        """One site's round in the Python TF runtime: (delta, update_weight, examples, loss)."""
        with tf.device(self.device):
            seed = data["seed"].reduce(tf.zeros([2], tf.int64), lambda _, s: s)
            delta, examples, loss_sum = self._client_update(
                [tf.constant(w) for w in weights], data["batches"], seed, tf.constant(lr)
            )
        weight = np.float32(examples.numpy()) if self._by_examples else np.float32(1.0)
        if self._private:  # the exact sample size and loss never leave a DP site (un-noised)
            return [d.numpy() for d in delta], weight, np.int64(0), np.float32(0.0)
        return [d.numpy() for d in delta], weight, examples.numpy(), loss_sum.numpy()

    def next(self, state, client_data: Sequence[dict]):
        weights = state.global_model_weights.trainable
        lr = np.float32(state.client_work)
        results = [self.client_update(weights, data, lr) for data in client_data]
        # no site (an empty site-level Poisson sample): the server step still adds its noise
        updates, update_weights, examples, losses = (
            [list(col) for col in zip(*results, strict=True)] if results else ([], [], [], [])
        )
        return self._server_step(state, updates, update_weights, examples, losses)


def default_device() -> str:
    """The first GPU when TensorFlow sees one, else the CPU."""
    return "/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"


def build_hybrid_process(
    cfg: Config,
    model_fn: Callable[[], tf.keras.Model],
    loss_fn: Callable,
    sites_per_round: int,
    dp_by_site: DpSgdSpec | None,
) -> HybridProcess:
    """Drop-in for `process.build_process` (same arguments, same state)."""
    return HybridProcess(cfg, model_fn, loss_fn, sites_per_round, dp_by_site)
