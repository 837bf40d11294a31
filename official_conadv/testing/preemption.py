"""A real preemption notice for tests and rehearsals.

`SigtermAt(step)` is a Keras callback that sends its own process SIGTERM,
the signal a TPU VM, GCE or Kubernetes sends before preempting, once the
optimizer has passed `step`; the trainer's handler must then stop at the next
step call, save that step and raise `train_lib.Preempted`.
"""

import os
import signal

import keras


class SigtermAt(keras.callbacks.Callback):
  """Sends this process SIGTERM once `optimizer.iterations >= step` (checked
  after every step call, so with `steps_per_execution` > 1 at the first call
  that ends at or past `step`)."""

  def __init__(self, step: int):
    super().__init__()
    self.step = step
    self.sent = False

  def on_train_batch_end(self, batch, logs=None):
    if not self.sent and int(self.model.optimizer.iterations.numpy()) >= \
        self.step:
      self.sent = True
      os.kill(os.getpid(), signal.SIGTERM)
