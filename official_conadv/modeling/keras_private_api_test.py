"""Pins the private Keras 3 behaviour ConAdvModel and convert.py rely on.

ConAdvModel uses public Keras API where there is one
(`keras.utils.unpack_x_y_sample_weight`, `Model.compute_loss`, symbolic
calls on `keras.KerasTensor` to build the backbone). Where there is none it
uses Keras internals; each test here fails if one of them changes meaning
(the optimizer's raw micro-step counter is pinned in conadv_model_test's
`test_keras_counter_convention_the_buffer_relies_on`, the MWMS trainer fix in
keras_mwms_fix_test):

  * `keras.src.losses.loss.scale_loss_for_distribution` /
    `unscale_loss_for_distribution`: the 1 / replicas factor Keras puts on
    the loss (ConAdvModel scales its extra loss terms the same way and logs
    unscaled values);
  * `Trainer._compile_loss._flat_losses[i].loss` / `.loss_weights`: the
    compiled `Loss` object (its per-example `call`, for weighted eval);
  * `Trainer._loss_tracker`: the "loss" metric of `model.metrics`;
  * `TensorFlowTrainer._maybe_symbolic_build(iterator, data_batch)` and
    `Trainer._symbolic_build(iterator, data_batch)`: the pre-step build hook
    ConAdvModel overrides and the builder it calls;
  * `keras.src.models.functional.Functional` and
    `Layer._register_call_context_args`: how `convert.py` tells functional
    models from subclassed ones and passes `bn_route` to the BN layers;
  * `TensorFlowTrainer._distribute_strategy` (the strategy whose scope the
    model was made in, else None) and the TF optimizer's
    `_distribution_strategy` (the strategy it was made under);
  * the optimizer's weight average (optimization/ema.py):
    `_model_variables_moving_average` paired with `_trainable_variables`,
    `_update_model_variables_moving_average(trainable_variables)` called
    after every update, and `fit` ending with
    `optimizer.finalize_variable_values(model.trainable_weights)`.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.losses import loss as keras_loss_module
from keras.src.trainers import trainer as base_trainer

from official_conadv.modeling import conadv_model
from official_conadv.modeling import small_cnn
from official_conadv.testing import strategies


def test_loss_scaling_is_one_over_replicas():
  """Identity on the default strategy; x / 2 and back under 2 replicas."""
  x = tf.constant(3.0)
  assert float(keras_loss_module.scale_loss_for_distribution(x)) == 3.0
  assert float(keras_loss_module.unscale_loss_for_distribution(x)) == 3.0
  mirrored = strategies.get("mirrored")

  def fn():
    scaled = keras_loss_module.scale_loss_for_distribution(x)
    return scaled, keras_loss_module.unscale_loss_for_distribution(scaled)

  scaled, unscaled = mirrored.run(fn)
  for value in mirrored.experimental_local_results(scaled):
    assert float(value) == 1.5
  for value in mirrored.experimental_local_results(unscaled):
    assert float(value) == 3.0


def test_flat_losses_hold_the_compiled_loss_object():
  """`_flat_losses[0].loss` is the compiled Loss (its per-example `call`
  averaged equals the compiled loss) and `loss_weights` is None unless given;
  the model's "loss" metric is `_loss_tracker`."""
  model = conadv_model.ConAdvModel(small_cnn.SmallCNN(num_classes=3))
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  model.compile(optimizer="sgd", loss=loss)
  y = np.array([0, 2, 1, 1])
  logits = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
  model._compile_loss.build(y, logits)  # pylint: disable=protected-access
  flat = model._compile_loss._flat_losses  # pylint: disable=protected-access
  assert len(flat) == 1
  assert flat[0].loss is loss and flat[0].loss_weights is None
  per_example = flat[0].loss.call(tf.constant(y), tf.constant(logits))
  assert per_example.shape == (4,)
  np.testing.assert_allclose(np.mean(per_example), loss(y, logits),
                             rtol=1e-6)
  model.compile(optimizer="sgd", loss=loss, loss_weights=0.5)
  model._compile_loss.build(y, logits)  # pylint: disable=protected-access
  assert model._compile_loss._flat_losses[0].loss_weights == 0.5  # pylint: disable=protected-access
  assert model._loss_tracker in model.metrics  # pylint: disable=protected-access
  assert model._loss_tracker.name == "loss"  # pylint: disable=protected-access


def test_symbolic_build_hooks_keep_their_signatures():
  """The hook ConAdvModel overrides is what fit, evaluate, train_on_batch
  and test_on_batch call before their first step (predict builds through
  `call`), and the builder takes a data batch."""
  hook = inspect.signature(tf_trainer.TensorFlowTrainer._maybe_symbolic_build)  # pylint: disable=protected-access
  assert list(hook.parameters) == ["self", "iterator", "data_batch"]
  build = inspect.signature(base_trainer.Trainer._symbolic_build)  # pylint: disable=protected-access
  assert list(build.parameters) == ["self", "iterator", "data_batch"]
  for method in ("fit", "evaluate", "train_on_batch", "test_on_batch"):
    source = inspect.getsource(getattr(tf_trainer.TensorFlowTrainer, method))
    assert "self._maybe_symbolic_build(" in source, method


def test_strategy_attributes_record_where_things_were_made():
  """`_distribute_strategy` is the scope's strategy (None outside any);
  the optimizer's `_distribution_strategy` likewise (default outside)."""
  outside = conadv_model.ConAdvModel(small_cnn.SmallCNN(num_classes=3))
  assert outside._distribute_strategy is None  # pylint: disable=protected-access
  assert (keras.optimizers.SGD()._distribution_strategy  # pylint: disable=protected-access
          is tf.distribute.get_strategy())
  mirrored = strategies.get("mirrored")
  with mirrored.scope():
    inside = conadv_model.ConAdvModel(small_cnn.SmallCNN(num_classes=3))
    optimizer = keras.optimizers.SGD()
  assert inside._distribute_strategy is mirrored  # pylint: disable=protected-access
  assert optimizer._distribution_strategy is mirrored  # pylint: disable=protected-access


def test_functional_models_forward_registered_call_context_args():
  """convert.py: `keras.Model(inputs, outputs)` is a
  `keras.src.models.functional.Functional`, and a layer that registers a
  call-context argument (`_register_call_context_args`) receives it from
  the enclosing functional model's call."""
  from keras.src.models.functional import Functional  # pylint: disable=g-import-not-at-top

  class Routed(keras.layers.Layer):

    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      self._register_call_context_args("bn_route")  # pylint: disable=protected-access

    def call(self, inputs, bn_route=None):
      return inputs * (2.0 if bn_route == "adv" else 1.0)

  inputs = keras.Input((3,))
  model = keras.Model(inputs, Routed()(keras.layers.Dense(3)(inputs)))
  assert isinstance(model, Functional)
  x = np.ones((1, 3), "float32")
  main, adv = model(x), model(x, bn_route="adv")
  np.testing.assert_allclose(2.0 * np.asarray(main), adv)


def test_weight_average_internals_ema_py_relies_on():
  optimizer = keras.optimizers.SGD(0.5, use_ema=True, ema_momentum=0.5)
  variable = keras.Variable(np.ones(3, np.float32))
  calls = []
  update = optimizer._update_model_variables_moving_average

  def spy(trainable_variables):
    calls.append(list(trainable_variables))
    return update(trainable_variables)

  optimizer._update_model_variables_moving_average = spy
  optimizer.build([variable])
  assert [v is variable for v in optimizer._trainable_variables] == [True]
  (average,) = optimizer._model_variables_moving_average
  for _ in range(2):
    optimizer.apply_gradients([(tf.ones(3), variable)])
  assert len(calls) == 2 and calls[0][0] is variable
  # Step 0 copies the weights (1 - 0.5 = 0.5), step 1 mixes with 0.5:
  # (0.5 + 0.0) / 2.
  np.testing.assert_allclose(variable.numpy(), np.zeros(3))
  np.testing.assert_allclose(average.numpy(), np.full(3, 0.25))
  source = inspect.getsource(tf_trainer.TensorFlowTrainer.fit)
  assert "finalize_variable_values(self.trainable_weights)" in source
