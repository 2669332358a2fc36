"""Keras metrics that score a whole split, so fit's own validation pass yields macro-F1.

Imported only by the training code (it imports Keras). ``train.save_model`` compiles them out of
the saved file so that plain Keras loads it; they are registered for serialisation all the same,
for a model saved while compiled with them.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tumorscope")
class ConfusionScore(keras.metrics.Metric):
    """Macro-F1 (``class_index`` None) or one class's recall, from a confusion matrix accumulated
    over the epoch: exact over the whole split, not a mean of per-batch scores. Macro-F1 averages
    over the classes present in the truth, as ``evaluate.macro_f1_from_confusion`` does. Sample
    weights are ignored: both scores are already per class, and class weights must not change them.
    """

    def __init__(self, n_classes: int, class_index: int | None = None, name: str = "macro_f1", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self._direction = "up"  # higher is better, for callbacks in mode "auto"
        self.n_classes = n_classes
        self.class_index = class_index
        # float32 counts are exact up to 2**24 images per epoch.
        self.matrix = self.add_variable(shape=(n_classes, n_classes), initializer="zeros",
                                        name="confusion", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), self.n_classes, dtype="float32")
        predicted = ops.one_hot(ops.argmax(y_pred, axis=-1), self.n_classes, dtype="float32")
        self.matrix.assign_add(ops.matmul(ops.transpose(truth), predicted))

    def result(self):
        true_positive = ops.diagonal(self.matrix)
        support = ops.sum(self.matrix, axis=1)
        if self.class_index is not None:
            return ops.divide_no_nan(true_positive[self.class_index], support[self.class_index])
        f1 = ops.divide_no_nan(2.0 * true_positive, support + ops.sum(self.matrix, axis=0))
        occurs = ops.cast(support > 0, "float32")
        return ops.divide_no_nan(ops.sum(f1 * occurs), ops.sum(occurs))

    def reset_state(self):
        self.matrix.assign(ops.zeros((self.n_classes, self.n_classes), dtype="float32"))

    def get_config(self):
        return {"n_classes": self.n_classes, "class_index": self.class_index, "name": self.name, "dtype": self.dtype}


def split_scores(n_classes: int, critical_index: int | None) -> list[ConfusionScore]:
    """macro_f1 always; critical_recall when the data has the critical class. Keras logs them as
    ``val_macro_f1`` / ``val_critical_recall`` for the validation split."""
    scores = [ConfusionScore(n_classes, name="macro_f1")]
    if critical_index is not None:
        scores.append(ConfusionScore(n_classes, critical_index, name="critical_recall"))
    return scores
