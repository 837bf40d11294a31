"""Where benchmark results go: one JSON writer for every script (no flags
here, so any script can import it next to its own --output flag)."""

import json
import os


def write_json(result, output, indent=2):
  """Writes a benchmark's result dict to `output` (creating its folder); a
  falsy `output` writes nothing."""
  if not output:
    return
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=indent)
