"""The pinned stack installs and runs (the --no-deps TFF recipe of scripts/bootstrap.sh)."""

from __future__ import annotations

import numpy as np


def test_pinned_versions():
    import dp_accounting
    import tensorflow as tf
    import tensorflow_federated as tff
    import tensorflow_privacy

    assert tf.__version__ == "2.14.1"
    assert tff.__version__ == "0.87.0"
    assert tensorflow_privacy.__version__ == "0.9.0"
    import keras

    assert keras.__version__.startswith("2.14")  # Keras 2, never Keras 3
    assert tf.keras.optimizers.legacy.Adam  # what tf-privacy's DP optimizers need
    assert np.__version__.startswith("1.2")
    assert dp_accounting.GaussianDpEvent(1.0).noise_multiplier == 1.0


def test_a_federated_computation_runs_on_the_owned_runtime(tff_runtime):
    import tensorflow_federated as tff

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean(values):
        return tff.federated_mean(values)

    assert mean([1.0, 2.0, 6.0]) == 3.0
    assert tff.federated_computation(lambda: "x")() == b"x"
