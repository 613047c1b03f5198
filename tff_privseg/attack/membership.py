"""Loss-based membership-inference audit: can a threshold on the loss tell training slices from
held-out ones?

Per site, the trained model's per-slice loss (the training loss, per example) on the site's
training slices ("members") and on its held-out validation and test slices (other patients:
"non-members") feed the threshold attack of tensorflow-privacy's membership-inference library
(``privacy_tests.membership_inference_attack``: ROC of the loss as a membership score, AUC and
attacker advantage max|TPR - FPR|).

tensorflow-privacy 0.9.0's wheel does not ship ``privacy_tests`` (tensorflow/privacy#555), so
when that import fails the same threshold attack runs here, written to the library's definition
(``_run_threshold_attack``: sklearn ``roc_curve`` with non-members as the positive class and the
loss as the score; ``RocCurve.get_auc`` / ``get_attacker_advantage``). The result says which
implementation ran.

Non-members are other patients (the split is by patient, and neighbouring slices of one patient
are near-duplicates, so same-patient slices would not be non-members). With a handful of
patients per site the per-site AUC therefore mixes memorisation with plain differences between
the patients in each split, and it is noisy: read it next to a non-private run on the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tff_privseg.data import SiteData
from tff_privseg.losses import get_loss


def per_example_losses(
    model: tf.keras.Model, loss_name: str, images: np.ndarray, labels: np.ndarray, batch: int = 64
) -> np.ndarray:
    """Per-slice training loss [N] (inference mode)."""
    loss_fn = get_loss(loss_name)
    out = []
    for i in range(0, len(images), batch):
        probs = model(tf.constant(images[i : i + batch]), training=False)
        out.append(loss_fn(tf.constant(labels[i : i + batch], tf.int32), probs).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _tfp_threshold_attack(loss_train: np.ndarray, loss_test: np.ndarray) -> dict[str, float]:
    from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import (
        membership_inference_attack as mia,
    )
    from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack.data_structures import (  # noqa: E501
        AttackInputData,
        AttackType,
        SlicingSpec,
    )

    results = mia.run_attacks(
        AttackInputData(loss_train=loss_train, loss_test=loss_test),
        SlicingSpec(entire_dataset=True, all_classes=False),
        attack_types=[AttackType.THRESHOLD_ATTACK],
    )
    single = results.single_attack_results[0]
    return {
        "auc": float(single.get_auc()),
        "advantage": float(single.get_attacker_advantage()),
    }


def threshold_attack(loss_train: np.ndarray, loss_test: np.ndarray) -> dict[str, Any]:
    """AUC and attacker advantage of the loss-threshold membership attack."""
    loss_train = np.asarray(loss_train, np.float64)
    loss_test = np.asarray(loss_test, np.float64)
    try:
        out: dict[str, Any] = _tfp_threshold_attack(loss_train, loss_test)
        out["implementation"] = "tensorflow_privacy"
        return out
    except ImportError:
        pass
    from sklearn import metrics

    fpr, tpr, _ = metrics.roc_curve(
        np.concatenate((np.zeros(len(loss_train)), np.ones(len(loss_test)))),
        np.concatenate((loss_train, loss_test)),
    )
    return {
        "auc": float(metrics.auc(fpr, tpr)),
        "advantage": float(np.max(np.abs(tpr - fpr))),
        "implementation": "builtin (tensorflow_privacy threshold attack, same definition)",
    }


def membership_audit(
    model: tf.keras.Model, loss_name: str, sites: Sequence[SiteData], batch: int = 64
) -> dict[str, Any]:
    """Per-site loss-threshold membership attack: training slices vs held-out slices (the
    site's validation and test patients, never trained on)."""
    per_site: dict[str, dict[str, Any]] = {}
    all_train, all_test = [], []
    impl = None
    for s in sites:
        held_images = np.concatenate([s.val.images, s.test.images])
        held_labels = np.concatenate([s.val.labels, s.test.labels])
        if len(s.train) == 0 or len(held_images) == 0:
            per_site[s.name] = {"auc": None, "advantage": None, "reason": "empty split"}
            continue
        lt = per_example_losses(model, loss_name, s.train.images, s.train.labels, batch)
        lh = per_example_losses(model, loss_name, held_images, held_labels, batch)
        res = threshold_attack(lt, lh)
        impl = res.pop("implementation")
        per_site[s.name] = {
            **res,
            "n_train": int(len(lt)),
            "n_held_out": int(len(lh)),
            "patients_train": len(s.train.volumes),
            "patients_held_out": len(s.val.volumes) + len(s.test.volumes),
            "mean_loss_train": float(np.mean(lt)),
            "mean_loss_test": float(np.mean(lh)),
        }
        all_train.append(lt)
        all_test.append(lh)
    pooled = None
    if all_train:
        pooled = threshold_attack(np.concatenate(all_train), np.concatenate(all_test))
        impl = pooled.pop("implementation")
    aucs = [v["auc"] for v in per_site.values() if v.get("auc") is not None]
    advs = [v["advantage"] for v in per_site.values() if v.get("advantage") is not None]
    return {
        "sites": per_site,
        "pooled": pooled,
        "max_auc": max(aucs) if aucs else None,
        "max_advantage": max(advs) if advs else None,
        "attack": "loss threshold (members: training slices; non-members: val + test slices)",
        "implementation": impl,
    }


__all__ = ["membership_audit", "per_example_losses", "threshold_attack"]
