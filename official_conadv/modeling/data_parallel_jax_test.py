"""ConAdvModel under `keras.distribution.DataParallel` on 2 devices (JAX).

The BN semantics on JAX (decided in jax_trainer.py): the step is one
program over the global batch, so BN batch statistics are over the global
batch and the attack's noise is drawn for the global batch. Hence a
2-device run must equal a 1-device run with the same global batch (up to
the order of the cross-device sums), and every device's shard gets its own
noise. The run's data make the two halves of every batch differ (the second
half dimmed), so per-device statistics would not pass for global ones.

The devices are 2 host CPUs (XLA_FLAGS=--xla_force_host_platform_device_count=2,
set before JAX starts, hence a subprocess).
"""

import textwrap

from official_conadv.testing import backend_runs

SCRIPT = textwrap.dedent("""
    import json
    import jax
    import keras
    import numpy as np
    from official_conadv.testing import backend_runs

    devices = jax.devices()
    assert len(devices) == 2, devices
    x, y = backend_runs.data()
    # The second half of every batch dimmed to a quarter.
    halves = np.arange(len(x)) % backend_runs.BATCH >= backend_runs.BATCH // 2
    x[halves] *= 0.25

    def run(delay, schedule):
      model = backend_runs.make_model(delay, schedule, random_init=True)
      record = backend_runs._Record()  # pylint: disable=protected-access
      model.fit(x, y, batch_size=backend_runs.BATCH, epochs=1,
                shuffle=False, verbose=0, callbacks=[record])
      return model, record.steps

    cases = [(None, "delayed"), (1, "delayed"), (2, "lookahead")]
    single = {c: run(*c)[1] for c in cases}
    distribution = keras.distribution.DataParallel(devices=devices)
    keras.distribution.set_distribution(distribution)
    out = {}
    for c in cases:
      model, steps = run(*c)
      out[str(c)] = {
          "worst": max(float(np.abs(a - b).max())
                       for s1, s2 in zip(single[c], steps)
                       for a, b in zip(s1, s2)),
          "moved": min(float(np.abs(a - b).max())
                       for a, b in zip(steps[0], steps[-1])
                       if a.ndim == 4),
          "devices": len(model.backbone.trainable_variables[0]
                         .value.sharding.device_set),
      }
    # The attack's noise per device: a batch whose halves (one per device)
    # hold the same images and labels gets different noise on each half.
    model = backend_runs.make_model(1, random_init=True)
    same = np.concatenate([x[:4], x[:4]])
    labels = np.concatenate([y[:4], y[:4]])
    sharded = jax.device_put(same, distribution.get_data_layout(
        same.shape).backend_layout)
    x_adv = np.asarray(jax.jit(lambda a, b: model.adversarial_examples(
        a, b, 0, weights=[v.value for v in
                          model.backbone.trainable_variables]))(
        sharded, labels))
    noise = x_adv - same
    out["noise"] = {
        "input_devices": len(sharded.sharding.device_set),
        "halves_differ": float(np.abs(noise[:4] - noise[4:]).max()),
        "max_noise": float(np.abs(noise).max()),
    }
    print("RESULT " + json.dumps(out))
""")


def test_two_devices_equal_one_device_with_global_batch_semantics():
  result = backend_runs.run_jax_script(
      SCRIPT, xla_flags="--xla_force_host_platform_device_count=2")
  print(result)
  noise = result.pop("noise")
  for case, run in result.items():
    assert run["devices"] == 2, case  # The weights live on both devices.
    assert run["moved"] > 1e-4, case
    # Global-batch BN and noise: 2 devices == 1 device (cross-device sums
    # in another order: a few ulps).
    assert run["worst"] <= 1e-5, (case, run)
  assert noise["input_devices"] == 2
  # Each device's half got its own noise (same images, same labels).
  assert noise["halves_differ"] > 1e-3
  assert noise["max_noise"] <= 2.0 / 255 + 1e-6
