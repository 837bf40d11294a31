"""Tests for ema.py: Keras 3's weight average (`use_ema=True`) with
ConAdvModel and LARS, and the two context managers around it.

  * the optimizer's average is the hand-computed one (first step included);
  * Keras' `fit` ends with the weights overwritten by the averages, except
    inside `keep_raw_weights` (but not with `SwapEMAWeights(swap_on_epoch=
    True)`, which leaves the averages in the model);
  * inside `keep_raw_weights`, two fits of 2 steps end bit for bit like one
    of 4, also with an `averaged_weights` evaluation in between; Keras' own
    `SwapEMAWeights` swap (a + b, a - b arithmetic) is not exact;
  * `averaged_weights` swaps exactly and restores on exceptions, both are
    no-ops without an average, the average of a LossScaleOptimizer's inner
    optimizer is found; `keep_raw_weights` nests;
  * `keras.callbacks.SwapEMAWeights` evaluates the averages during
    `ConAdvModel.fit` (default strategy and 2-replica Mirrored).

Tiny problem: SmallCNN(filters=(4, 8)), 5 classes, 8x8x3 images, batches of
8, delay-1 ConAdv, LARS, `steps_per_execution=1`, no XLA.
"""

import contextlib

import keras
import numpy as np
import pytest

from official_conadv.modeling import conadv_model
from official_conadv.modeling import small_cnn
from official_conadv.optimization import ema
from official_conadv.optimization import lars
from official_conadv.testing import conadv_worker
from official_conadv.testing import strategies
# pylint: disable=protected-access

NUM_CLASSES = 5
SHAPE = (8, 8, 3)
BATCH = 8
MOMENTUM = 0.8
ADVERSARY = conadv_model.AdversaryConfig(
    epsilon=0.1, step_size=0.05, steps=1, random_init=False, delay=1, seed=3)
# Float32 elementwise arithmetic in a different order/fusion than numpy's
# (e.g. a fused multiply-add) changes the last bit of a step; the weights are
# O(1) (float32 spacing ~1e-7 there), so 1e-6 allows a few ulps per step
# and would still catch any wrong momentum or first-step rule (>= 1e-3 here).
AVERAGE_TOL = 1e-6


def _data(num_batches, seed=0):
  rng = np.random.default_rng(seed)
  n = num_batches * BATCH
  x = rng.uniform(0.0, 1.0, (n,) + SHAPE).astype("float32")
  y = rng.integers(0, NUM_CLASSES, n).astype("int32")
  return x, y


def _optimizer(use_ema=True, loss_scale=False, **kwargs):
  kwargs.setdefault("ema_momentum", MOMENTUM)
  optimizer = lars.LARS(learning_rate=0.5, momentum=0.9,
                        weight_decay_rate=1e-4, eeta=0.1, use_ema=use_ema,
                        **kwargs)
  if loss_scale:
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def _model(use_ema=True, loss_scale=False, strategy=None, **kwargs):
  """A compiled delay-1 ConAdvModel with fixed initial weights (in
  `strategy`'s scope when given)."""
  scope = strategy.scope() if strategy is not None else (
      contextlib.nullcontext())
  with scope:
    backbone = small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8))
    model = conadv_model.ConAdvModel(backbone, adversary=ADVERSARY)
    model.build((None,) + SHAPE)
    conadv_worker.initialize_weights(model.backbone.weights)
    model.compile(
        optimizer=_optimizer(use_ema, loss_scale, **kwargs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
        steps_per_execution=1, jit_compile=False)
  return model


def _fit(model, x, y, callbacks=(), **kwargs):
  return model.fit(x, y, batch_size=BATCH, epochs=kwargs.pop("epochs", 1),
                   shuffle=False, verbose=0, callbacks=list(callbacks),
                   **kwargs)


def _numpy(variables):
  return [np.array(v.numpy()) for v in variables]


def _raw(model):
  return _numpy(v for v, _ in ema.weight_average_pairs(model.optimizer))


def _averages(model):
  return _numpy(a for _, a in ema.weight_average_pairs(model.optimizer))


def _max_diff(got, want):
  return max(float(np.max(np.abs(g.astype("float64") - w.astype("float64"))))
             if g.size else 0.0 for g, w in zip(got, want))


def _assert_bitwise(got, want, what):
  assert len(got) == len(want), what
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(g, w, err_msg=f"{what} #{i}")


def _state(model):
  """Every model weight (BN statistics and the stale-weight ring buffer
  included) and every optimizer variable (iterations, momentum slots,
  averages)."""
  return _numpy(model.weights) + _numpy(model.optimizer.variables)


class _Recorder(keras.callbacks.Callback):
  """The averaged variables (raw weights) and their averages after every
  training batch."""

  def __init__(self):
    super().__init__()
    self.raw, self.averages = [], []

  def on_train_batch_end(self, batch, logs=None):
    self.raw.append(_raw(self.model))
    self.averages.append(_averages(self.model))


def _hand_average(weights, momentum, warmup=False):
  """a_1 = w_1, a_t = m_t a_{t-1} + (1 - m_t) w_t in float32, as Keras
  orders the operations; m_t = m, or with `warmup` (ema.AverageWarmup)
  min(m, (1 + i) / (10 + i)), i = t - 1 the optimizer's iterations before
  step t."""
  averages = [w.copy() for w in weights[0]]
  for i, step in enumerate(weights[1:], start=1):
    m = np.float32(momentum)
    if warmup:
      i32 = np.float32(i)
      m = min(m, (np.float32(1.0) + i32) / (np.float32(10.0) + i32))
    one_minus = np.float32(1.0) - m
    averages = [m * a + one_minus * w for a, w in zip(averages, step)]
  return averages


# ------------------------------------------------ one shared run of 4 steps
@pytest.fixture(scope="module")
def run4():
  """One fit of 4 steps inside keep_raw_weights: (model, recorder, state
  right after the fit)."""
  model = _model()
  x, y = _data(4)
  recorder = _Recorder()
  with ema.keep_raw_weights(model.optimizer):
    _fit(model, x, y, [recorder])
  assert int(model.optimizer.iterations.numpy()) == 4
  return model, recorder, _state(model)


@pytest.fixture
def trained(run4):
  """run4's model and recorder; every model and optimizer variable is put
  back (exactly) after the test."""
  model, recorder, state = run4
  yield model, recorder
  variables = list(model.weights) + list(model.optimizer.variables)
  for v, value in zip(variables, state):
    v.assign(value)


# --------------------------------------------------- the average, by hand
def test_the_average_is_the_hand_computed_one_and_fit_keeps_raw_weights(
    run4):
  model, recorder, _ = run4
  pairs = ema.weight_average_pairs(model.optimizer)
  # Every trainable weight is averaged (both BN routes' gamma and beta).
  assert ({v.path for v, _ in pairs} ==
          {v.path for v in model.trainable_weights})
  assert any("/adv/" in v.path for v, _ in pairs)
  # Keras 3.15, base_optimizer._update_model_variables_moving_average: run
  # after every update, before `iterations` is incremented, with
  # momentum = cast(iterations != 0) * ema_momentum and
  # average = momentum * average + (1 - momentum) * w. At the first step
  # (iterations == 0): average = 0 * 0 + 1 * w = w exactly (a_1 = w_1);
  # later a_t = m * a_{t-1} + (1 - m) * w_t, m and 1 - m float32.
  _assert_bitwise(recorder.averages[0], recorder.raw[0], "a_1 = w_1")
  for t in range(1, 4):
    assert _max_diff(recorder.raw[t], recorder.raw[t - 1]) > 1e-3
  want = _hand_average(recorder.raw, MOMENTUM)
  got = _averages(model)
  diff = _max_diff(got, want)
  print(f"max |keras average - hand average| = {diff:.3g}")  # 0 measured.
  assert diff <= AVERAGE_TOL
  # A wrong momentum or first-step rule would show: the average is far from
  # the last weights and from a plain mean.
  assert _max_diff(got, recorder.raw[-1]) > 1e-3
  mean = [np.mean(ws, axis=0) for ws in zip(*recorder.raw)]
  assert _max_diff(got, mean) > 1e-3
  # keep_raw_weights: the model ends with the raw weights of the last step.
  _assert_bitwise(_raw(model), recorder.raw[-1], "raw weights after fit")


def test_the_warmup_average_is_the_hand_computed_one():
  """ema.AverageWarmup (LARS' ema_warmup=True): m_t = min(m, (1 + i) /
  (10 + i)). With m = 0.2 both branches run: 2/11 at the 2nd step, then
  m (3/12, 4/13 > 0.2)."""
  model = _model(ema_momentum=0.2, ema_warmup=True)
  assert model.optimizer.get_config()["ema_warmup"] is True
  x, y = _data(4)
  recorder = _Recorder()
  with ema.keep_raw_weights(model.optimizer):
    _fit(model, x, y, [recorder])
  _assert_bitwise(recorder.averages[0], recorder.raw[0], "a_1 = w_1")
  got = _averages(model)
  diff = _max_diff(got, _hand_average(recorder.raw, 0.2, warmup=True))
  # Not the fixed-momentum average, and the 2nd step used 2/11, not 0.2.
  fixed = _max_diff(got, _hand_average(recorder.raw, 0.2))
  second = _max_diff(recorder.averages[1],
                     _hand_average(recorder.raw[:2], 0.2))
  print(f"warmup: max |keras - hand| = {diff:.3g}, vs fixed momentum "
        f"{fixed:.3g}, 2nd step vs fixed {second:.3g}")
  assert diff <= AVERAGE_TOL
  assert fixed > 1e-4 and second > 1e-4
  _assert_bitwise(_raw(model), recorder.raw[-1], "raw weights after fit")


def test_keras_fit_ends_with_the_weights_overwritten_by_the_averages(trained):
  model, _ = trained
  x, y = _data(2, seed=5)
  recorder = _Recorder()
  _fit(model, x, y, [recorder])  # Steps 5 and 6, no keep_raw_weights.
  # Keras: `fit` ends with optimizer.finalize_variable_values, which assigns
  # the averages to the weights (the averages themselves are unchanged).
  _assert_bitwise(_averages(model), recorder.averages[-1], "averages")
  _assert_bitwise(_raw(model), recorder.averages[-1], "weights = averages")
  assert _max_diff(_raw(model), recorder.raw[-1]) > 1e-3


def test_swap_on_epoch_inside_keep_raw_weights_ends_with_the_averages(
    trained):
  """Keras' SwapEMAWeights(swap_on_epoch=True) leaves the averages in the
  model at the last epoch end and copies them over the averages' variables
  (`_finalize_ema_values`), counting on fit's final overwrite: inside
  keep_raw_weights the model ends with (nearly) the averages and the raw
  weights are lost. Use swap_on_epoch=False (the default) or
  averaged_weights after the fit."""
  model, _ = trained
  x, y = _data(2, seed=5)
  recorder = _Recorder()
  with ema.keep_raw_weights(model.optimizer):
    _fit(model, x, y,
         [keras.callbacks.SwapEMAWeights(swap_on_epoch=True), recorder])
  diff = _max_diff(_raw(model), recorder.averages[-1])
  print(f"swap_on_epoch: max |weights - averages| = {diff:.3g}")
  assert diff < 1e-6
  assert _max_diff(_raw(model), recorder.raw[-1]) > 1e-3
  _assert_bitwise(_averages(model), _raw(model), "averages = weights")


# ------------------------------------------ loop ends change nothing (exact)
def _split_run(evaluate_between):
  model = _model()
  x, y = _data(4)
  xv, yv = _data(2, seed=7)
  with ema.keep_raw_weights(model.optimizer):
    _fit(model, x[:2 * BATCH], y[:2 * BATCH])
    if evaluate_between:
      before = _state(model)
      with ema.averaged_weights(model):
        _assert_bitwise(_raw(model), _averages(model), "averages swapped in")
        model.evaluate(xv, yv, batch_size=BATCH, verbose=0)
      _assert_bitwise(_state(model), before, "state after averaged_weights")
    _fit(model, x[2 * BATCH:], y[2 * BATCH:])
  return _state(model)


@pytest.mark.parametrize("evaluate_between", [False, True],
                         ids=["plain", "averaged_evaluation"])
def test_two_fits_of_2_equal_one_fit_of_4(run4, evaluate_between):
  _assert_bitwise(_split_run(evaluate_between), run4[2],
                  "2 + 2 steps vs 4 steps")


def test_keras_swap_ema_weights_arithmetic_is_not_exact(trained):
  """SwapEMAWeights swaps in and out with a += b; b = a - b; a -= b: the
  raw weights and the averages come back changed in their last bits, and
  the weights it evaluates are not exactly the averages."""
  model, _ = trained
  raw, averages = _raw(model), _averages(model)
  swap = keras.callbacks.SwapEMAWeights()
  swap.set_model(model)
  swap.on_test_begin()
  swapped_in = _raw(model)
  swap.on_test_end()
  diffs = {"swapped-in weights vs averages": _max_diff(swapped_in, averages),
           "raw weights after the round trip": _max_diff(_raw(model), raw),
           "averages after the round trip": _max_diff(_averages(model),
                                                      averages)}
  print(diffs)
  # Close (a few float32 ulps)...
  assert max(diffs.values()) < 1e-6
  # ... but not bit for bit; averaged_weights is (test above).
  assert diffs["raw weights after the round trip"] > 0


# --------------------------------------------------- the context managers
def test_averaged_weights_swaps_exactly_and_restores_also_on_exceptions(
    trained):
  model, _ = trained
  raw, averages = _raw(model), _averages(model)
  assert _max_diff(raw, averages) > 1e-3
  others = _numpy(model.non_trainable_weights)
  with ema.averaged_weights(model):
    _assert_bitwise(_raw(model), averages, "inside: the averages")
    _assert_bitwise(_averages(model), averages, "inside: averages kept")
    _assert_bitwise(_numpy(model.non_trainable_weights), others,
                    "inside: non-trainable weights untouched")
  _assert_bitwise(_raw(model), raw, "after: the raw weights")
  _assert_bitwise(_averages(model), averages, "after: the averages")

  with pytest.raises(RuntimeError, match="in the body"):
    with ema.averaged_weights(model):
      _assert_bitwise(_raw(model), averages, "inside: the averages")
      raise RuntimeError("in the body")
  _assert_bitwise(_raw(model), raw, "after an exception: the raw weights")
  _assert_bitwise(_averages(model), averages, "after an exception: averages")


def test_keep_raw_weights_removes_its_patch_also_on_exceptions():
  optimizer = _optimizer()
  cls_method = type(optimizer).finalize_variable_values
  with ema.keep_raw_weights(optimizer):
    assert "finalize_variable_values" in vars(optimizer)
    assert optimizer.finalize_variable_values([]) is None
  assert "finalize_variable_values" not in vars(optimizer)
  assert optimizer.finalize_variable_values.__func__ is cls_method
  with pytest.raises(RuntimeError):
    with ema.keep_raw_weights(optimizer):
      raise RuntimeError("in the body")
  assert "finalize_variable_values" not in vars(optimizer)
  assert optimizer.finalize_variable_values.__func__ is cls_method


def test_keep_raw_weights_nests():
  optimizer = _optimizer()
  with ema.keep_raw_weights(optimizer):
    with ema.keep_raw_weights(optimizer):
      pass
    # Still inside the outer one: the patch must still be there.
    assert "finalize_variable_values" in vars(optimizer)
  assert "finalize_variable_values" not in vars(optimizer)


def test_without_an_average_both_are_no_ops():
  model = _model(use_ema=False)
  optimizer = model.optimizer
  assert not ema.enabled(optimizer) and ema.ema_optimizer(optimizer) is None
  x, y = _data(2)
  raw = []

  class _Last(keras.callbacks.Callback):

    def on_train_batch_end(self, batch, logs=None):
      raw[:] = [_numpy(self.model.trainable_weights)]

  with ema.keep_raw_weights(optimizer):
    assert "finalize_variable_values" not in vars(optimizer)
    _fit(model, x, y, [_Last()])
  _assert_bitwise(_numpy(model.trainable_weights), raw[0], "after fit")
  with pytest.raises(ValueError, match="no weight average"):
    ema.weight_average_pairs(optimizer)
  before = _numpy(model.weights)
  with ema.averaged_weights(model):
    _assert_bitwise(_numpy(model.weights), before, "inside, no average")
  _assert_bitwise(_numpy(model.weights), before, "after, no average")
  # An uncompiled model (no optimizer): nothing happens either.
  backbone = small_cnn.SmallCNN(num_classes=NUM_CLASSES, filters=(4, 8))
  with ema.averaged_weights(backbone):
    pass


def test_an_unbuilt_optimizer_has_no_pairs():
  optimizer = _optimizer()
  assert ema.enabled(optimizer)
  with pytest.raises(ValueError, match="not built"):
    ema.weight_average_pairs(optimizer)


def test_the_average_of_a_loss_scale_optimizer_is_its_inner_one():
  model = _model(loss_scale=True)
  x, y = _data(2)
  recorder = _Recorder()
  with ema.keep_raw_weights(model.optimizer):
    _fit(model, x, y, [recorder])
  optimizer = model.optimizer
  assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
  assert ema.ema_optimizer(optimizer) is optimizer.inner_optimizer
  pairs = ema.weight_average_pairs(optimizer)
  assert ({v.path for v, _ in pairs} ==
          {v.path for v in model.trainable_weights})
  raw, averages = _raw(model), _averages(model)
  # keep_raw_weights patched the outer optimizer, which fit calls.
  _assert_bitwise(raw, recorder.raw[-1], "raw weights after fit")
  _assert_bitwise(averages, recorder.averages[-1], "averages")
  _assert_bitwise(averages, _hand_average(recorder.raw, MOMENTUM),
                  "hand-computed average")
  assert _max_diff(raw, averages) > 1e-3
  with ema.averaged_weights(model):
    _assert_bitwise(_raw(model), averages, "inside: the averages")
  _assert_bitwise(_raw(model), raw, "after: the raw weights")
  assert not ema.enabled(keras.optimizers.LossScaleOptimizer(
      _optimizer(use_ema=False)))


# ------------------------------------------- keras.callbacks.SwapEMAWeights
class _ValidationRecorder(_Recorder):
  """Also the weights the validation runs with (placed after
  SwapEMAWeights, so its on_test_begin sees them swapped in) and the
  trainable weights after the swap out."""

  def __init__(self):
    super().__init__()
    self.validated, self.after_validation = [], []

  def on_test_begin(self, logs=None):
    self.validated.append(_raw(self.model))

  def on_test_end(self, logs=None):
    self.after_validation.append(_raw(self.model))


def _replicas_agree(model):
  """Every averaged variable and average holds the same value on every
  replica (bit for bit)."""
  strategy = model.distribute_strategy
  for pair in ema.weight_average_pairs(model.optimizer):
    for variable in pair:
      copies = [c.numpy() for c in
                strategy.experimental_local_results(variable.value)]
      assert len(copies) == strategy.num_replicas_in_sync
      for copy in copies[1:]:
        np.testing.assert_array_equal(copy, copies[0], err_msg=variable.path)


def _evaluate_with(model, weights, x, y):
  """model.evaluate with `weights` assigned to the averaged variables, the
  previous values put back afterwards."""
  variables = [v for v, _ in ema.weight_average_pairs(model.optimizer)]
  saved = _numpy(variables)
  for v, w in zip(variables, weights):
    v.assign(w)
  try:
    return model.evaluate(x, y, batch_size=BATCH, verbose=0,
                          return_dict=True)
  finally:
    for v, w in zip(variables, saved):
      v.assign(w)


@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_swap_ema_weights_validates_the_averages(strategy_name):
  strategy = strategies.get(strategy_name)
  model = _model(strategy=strategy)
  x, y = _data(4)
  xv, yv = _data(2, seed=7)
  recorder = _ValidationRecorder()
  with ema.keep_raw_weights(model.optimizer):
    history = _fit(model, x, y, [keras.callbacks.SwapEMAWeights(), recorder],
                   epochs=2, steps_per_epoch=2, validation_data=(xv, yv))
  val_loss = history.history["val_loss"]
  assert len(val_loss) == 2 and len(recorder.validated) == 2
  diffs = {}
  for epoch in range(2):
    step = 2 * epoch + 1  # The last step of the epoch.
    # Validation ran with (nearly) the averages, not the raw weights.
    diffs[f"epoch {epoch}: validated vs averages"] = _max_diff(
        recorder.validated[epoch], recorder.averages[step])
    assert _max_diff(recorder.validated[epoch], recorder.raw[step]) > 1e-3
    diffs[f"epoch {epoch}: swapped back vs raw"] = _max_diff(
        recorder.after_validation[epoch], recorder.raw[step])
  # Exact: the same weights, the same synchronised BN statistics, the same
  # data and test function give the logged loss bit for bit.
  replay = _evaluate_with(model, recorder.validated[-1], xv, yv)
  assert replay["loss"] == val_loss[-1]
  # With averaged_weights (the exact averages): equal up to the swap's
  # rounding of the weights (<= 6e-8 measured, see `diffs`), i.e. to a
  # relative 1e-5 at most (the loss itself came out equal, 0 measured).
  with ema.averaged_weights(model):
    averaged = model.evaluate(xv, yv, batch_size=BATCH, verbose=0,
                              return_dict=True)
  diffs["val_loss vs averaged_weights evaluation"] = abs(
      averaged["loss"] - val_loss[-1])
  raw = model.evaluate(xv, yv, batch_size=BATCH, verbose=0, return_dict=True)
  diffs["raw vs averaged evaluation"] = abs(raw["loss"] - averaged["loss"])
  print(strategy_name, diffs)
  assert max(v for k, v in diffs.items() if k.startswith("epoch")) < 1e-6
  np.testing.assert_allclose(averaged["loss"], val_loss[-1], rtol=1e-5)
  # ... and the averages are not the raw weights' evaluation.
  assert diffs["raw vs averaged evaluation"] > 1e-4
  # After the fit (keep_raw_weights): the raw weights, up to the swap.
  assert _max_diff(_raw(model), recorder.raw[-1]) < 1e-6
  _replicas_agree(model)
