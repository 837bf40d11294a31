"""The JAX path never imports TensorFlow: every model kind through compile,
fit, evaluate, predict and inference_model with TensorFlow unimportable."""

import textwrap

import numpy as np

from official_conadv.testing import backend_runs


# Runs with TensorFlow made unimportable: every model kind through compile,
# fit, evaluate, predict and inference_model on JAX.
NO_TENSORFLOW = textwrap.dedent("""
    import sys

    class Block:
      def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
          raise ImportError("TensorFlow is blocked in this test: " + name)

    sys.meta_path.insert(0, Block())
    import json
    import keras
    import numpy as np
    from official_conadv.adversarial import schedules
    from official_conadv.modeling import conadv_model, convert, resnet
    from official_conadv.modeling import small_cnn
    from official_conadv.optimization import lars, lr_schedules

    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 5, 16).astype("int32")
    backbones = {
        "small_cnn": lambda: small_cnn.SmallCNN(5, filters=(4, 8)),
        "resnet": lambda: resnet.ResNet(depth=18, num_classes=5,
                                        variant="cifar", width=8),
        "mobilenet_v3_small": lambda: convert.dual_bn_backbone(
            keras.applications.MobileNetV3Small(
                weights=None, input_shape=(32, 32, 3), classes=5,
                classifier_activation=None, include_preprocessing=False)),
    }
    runs = [("small_cnn", "delayed"), ("small_cnn", "lookahead"),
            ("resnet", "delayed"), ("mobilenet_v3_small", "lookahead")]
    out = {}
    for name, schedule in runs:
      make = backbones[name]
      model = conadv_model.ConAdvModel(
          make(), adversary=schedules.AdversaryConfig(
              delay=1, schedule=schedule, steps=2))
      model.compile(
          optimizer=lars.LARS(lr_schedules.WarmupPolynomialDecay(
              0.1, total_steps=6, warmup_steps=1), momentum=0.9),
          loss=keras.losses.SparseCategoricalCrossentropy(
              from_logits=True), metrics=["accuracy"])
      history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                          verbose=0)
      logs = model.evaluate(x, y, batch_size=8, verbose=0,
                            return_dict=True)
      logits = model.predict(x, batch_size=8, verbose=0)
      export = model.inference_model()
      exported = np.asarray(export(x, training=False))
      # The export holds copies: training on does not free its arrays
      # (JAX's fit donates the model's buffers).
      model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
      again = np.asarray(export(x, training=False))
      out[f"{name}/{schedule}"] = {
          "steps": int(model.optimizer.iterations),
          "loss": history.history["loss"],
          "examples": float(logs["examples"]),
          "export_diff": float(np.abs(exported - logits).max()),
          "export_weights": len(export.weights),
          "finite": bool(np.isfinite(logits).all()),
          "export_kept": bool(np.array_equal(exported, again)),
      }
    out["tensorflow_loaded"] = sorted(
        m for m in sys.modules if m == "tensorflow" or
        m.startswith("tensorflow."))
    print("RESULT " + json.dumps(out))
""")


def test_jax_path_never_imports_tensorflow():
  """SmallCNN (delayed and lookahead), ResNet (delayed) and a converted
  keras.applications model (lookahead), all dual BN with PGD-2 and LARS,
  train, evaluate, predict and export with TensorFlow unimportable, and no
  tensorflow module gets loaded."""
  result = backend_runs.run_jax_script(NO_TENSORFLOW)
  assert result.pop("tensorflow_loaded") == []
  assert len(result) == 4
  for name, run in result.items():
    assert run["steps"] == 6, name
    assert run["export_kept"], name
    assert run["examples"] == 16.0, name
    assert run["finite"], name
    assert all(np.isfinite(run["loss"])), name
    # The export (main BN only) predicts what the model predicts.
    assert run["export_diff"] <= 1e-5, (name, run["export_diff"])
