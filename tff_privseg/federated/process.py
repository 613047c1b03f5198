"""The TFF learning process: broadcast -> client work -> aggregation -> server optimizer.

Composed from TFF's own templates (`compose_learning_process`), with our client work (plain or
DP-SGD local training) and TFF aggregators: weighted/unweighted mean, optional secure sum, or
`DifferentiallyPrivateFactory` (site-level DP-FedAvg, fixed or quantile-adaptive clipping).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_privacy as tfp

from tff_privseg.config import Config
from tff_privseg.federated.client import build_client_update
from tff_privseg.privacy.dp_sgd import DpSgdSpec

# Bound on every coordinate of a client update when summed with the secure-sum factory.
SECURE_SUM_BOUND = 1.0


def tff_optimizer(
    name: str, lr: float, beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.0
) -> tff.learning.optimizers.Optimizer:
    """A TFF optimizer: Adam (AdamW when weight_decay > 0) or plain SGD."""
    if name == "adam" and weight_decay > 0:
        return tff.learning.optimizers.build_adamw(
            learning_rate=lr, beta_1=beta1, beta_2=beta2, weight_decay=weight_decay
        )
    if name == "adam":
        return tff.learning.optimizers.build_adam(learning_rate=lr, beta_1=beta1, beta_2=beta2)
    return tff.learning.optimizers.build_sgdm(learning_rate=lr)


def client_optimizer(cfg: Config) -> tff.learning.optimizers.Optimizer:
    t = cfg.train
    return tff_optimizer(t.client_optimizer, t.client_lr, t.beta1, t.beta2, t.weight_decay)


def client_data_type(resolution: int) -> tff.StructWithPythonType:
    """Per-site input: batches (x, y, slot weight) and the site's secret noise seed."""
    batch = (
        tff.TensorType(np.float32, [None, resolution, resolution, 1]),
        tff.TensorType(np.int32, [None, resolution, resolution]),
        tff.TensorType(np.float32, [None]),
    )
    return tff.StructWithPythonType(
        [
            ("batches", tff.SequenceType(batch)),
            ("seed", tff.SequenceType(tff.TensorType(np.int64, [2]))),
        ],
        collections.OrderedDict,
    )


def build_aggregator(cfg: Config, sites_per_round: int) -> tff.aggregators.AggregationFactory:
    p = cfg.privacy
    if p.level == "site":
        if p.clipping == "adaptive":
            # TFF's default (0.05 x clients per round) fails for a handful of sites: the count
            # noise must exceed noise_multiplier / 2. Default: max(0.05 k, σ), which costs
            # ~15 % more value noise for the same total ε.
            count_std = p.clipped_count_stddev or max(sites_per_round / 20.0, p.noise_multiplier)
            return tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
                noise_multiplier=p.noise_multiplier,
                clients_per_round=sites_per_round,
                initial_l2_norm_clip=p.l2_norm_clip,
                target_unclipped_quantile=p.target_quantile,
                learning_rate=p.clip_learning_rate,
                clipped_count_stddev=count_std,
            )
        query = tfp.NormalizedQuery(
            tfp.GaussianSumQuery(p.l2_norm_clip, p.l2_norm_clip * p.noise_multiplier),
            denominator=float(sites_per_round),
        )
        record_sum = _secure_sum() if p.secure_aggregation else None
        return tff.aggregators.DifferentiallyPrivateFactory(query, record_sum)
    value_sum = _secure_sum() if p.secure_aggregation else None
    if cfg.train.weighting == "examples":
        return tff.aggregators.MeanFactory(value_sum_factory=value_sum)
    return tff.aggregators.UnweightedMeanFactory(value_sum_factory=value_sum)


def _secure_sum() -> tff.aggregators.SecureSumFactory:
    # TFF's runtime implements the semantics of secure summation (bounded values, sum only),
    # not the cryptographic protocol.
    return tff.aggregators.SecureSumFactory(
        upper_bound_threshold=SECURE_SUM_BOUND, lower_bound_threshold=-SECURE_SUM_BOUND
    )


def build_server_processes(
    cfg: Config, sites_per_round: int, weights_type: tff.StructWithPythonType
) -> tuple[tff.templates.AggregationProcess, tff.learning.templates.FinalizerProcess]:
    """The aggregation of the sites' trainable deltas (float32 update weights) and the finalizer
    that applies the server optimizer to the global `ModelWeights` (`weights_type`)."""
    aggregator = build_aggregator(cfg, sites_per_round)
    if isinstance(aggregator, tff.aggregators.UnweightedAggregationFactory):
        aggregator = tff.aggregators.as_weighted_aggregator(aggregator)
    aggregation = aggregator.create(weights_type.trainable, tff.TensorType(np.float32))
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
        tff_optimizer(cfg.train.server_optimizer, cfg.train.server_lr), weights_type
    )
    return aggregation, finalizer


def build_process(
    cfg: Config,
    model_fn: Callable[[], tf.keras.Model],
    loss_fn: Callable,
    sites_per_round: int,
    dp_by_site: DpSgdSpec | None,
) -> tff.learning.templates.LearningProcess:
    """A TFF `LearningProcess` for `cfg`.

    `dp_by_site` carries the DP-SGD parameters; with sample-level DP every site uses the same
    clip and noise multiplier, and its expected batch size (batch_size) is the same too, so one
    client computation serves all sites.
    """
    with tf.Graph().as_default():
        template = model_fn()
        specs = [tf.TensorSpec(v.shape, v.dtype) for v in template.trainable_variables]
    trainable_type = tff.StructWithPythonType(
        [tff.TensorType(s.dtype.as_numpy_dtype, s.shape) for s in specs], list
    )
    weights_type = tff.StructWithPythonType(
        [("trainable", trainable_type), ("non_trainable", tff.StructWithPythonType([], list))],
        tff.learning.models.ModelWeights,
    )
    data_type = client_data_type(cfg.data.resolution)

    @tff.tensorflow.computation
    def initial_weights():
        model = model_fn()
        return tff.learning.models.ModelWeights(
            trainable=[v.read_value() for v in model.trainable_variables], non_trainable=[]
        )

    client_opt = client_optimizer(cfg)
    lr_type = tff.TensorType(np.float32)
    private = cfg.privacy.level != "none"

    @tff.tensorflow.computation(weights_type, data_type, lr_type)
    def client_update(weights, data, lr):
        update = build_client_update(model_fn, loss_fn, client_opt, dp_by_site)
        seed = data["seed"].reduce(tf.zeros([2], tf.int64), lambda _, s: s)
        delta, examples, loss_sum = update(list(weights.trainable), data["batches"], seed, lr)
        weight = (
            tf.cast(examples, tf.float32) if cfg.train.weighting == "examples" else tf.constant(1.0)
        )
        if private:  # the exact sample size and loss never leave a DP site (un-noised)
            examples, loss_sum = tf.zeros_like(examples), tf.zeros_like(loss_sum)
        metrics = collections.OrderedDict(examples=examples, loss_sum=loss_sum)
        return tff.learning.templates.ClientResult(update=delta, update_weight=weight), metrics

    # The client work's state is the client learning rate of the round: the driver sets it
    # (log-linear schedule) and TFF broadcasts it to the sites.
    @tff.federated_computation
    def client_init():
        return tff.federated_value(np.float32(cfg.train.client_lr), tff.SERVER)

    @tff.federated_computation(
        tff.FederatedType(lr_type, tff.SERVER),
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(data_type, tff.CLIENTS),
    )
    def client_next(state, weights, data):
        lr = tff.federated_broadcast(state)
        results, metrics = tff.federated_map(client_update, (weights, data, lr))
        train = collections.OrderedDict(
            examples=tff.federated_sum(metrics.examples),
            loss_sum=tff.federated_sum(metrics.loss_sum),
        )
        return tff.templates.MeasuredProcessOutput(state, results, tff.federated_zip(train))

    client_work = tff.learning.templates.ClientWorkProcess(client_init, client_next)
    aggregation, finalizer = build_server_processes(cfg, sites_per_round, weights_type)
    return tff.learning.templates.compose_learning_process(
        initial_weights,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work,
        aggregation,
        finalizer,
    )
