r"""Figures for the batch study and the step-time benchmark.

  python -m benchmarks.plots \
      --batch_study=experiments/results/batch_study.json \
      --step_time=experiments/results/step_time_cpu_r50_64px.json \
      --out_dir=experiments/results

writes `batch_study_top1.png` (held-out top-1 vs batch size per method, mean
± std over seeds at the validation-selected learning rate, log x) and
`step_time.png` (median step time per mode, min-max whiskers, with the FLOP
model's prediction, baseline x 8/3, marked). Titles carry the machine, date
and command the numbers came from.
"""

import datetime
import json
import os
import textwrap

from absl import app
from absl import flags

flags.DEFINE_string("batch_study", "experiments/results/batch_study.json",
                    "batch_study.py JSON ('' to skip).")
flags.DEFINE_string("step_time",
                    "experiments/results/step_time_cpu_r50_64px.json",
                    "step_time.py JSON ('' to skip).")
flags.DEFINE_string("out_dir", "experiments/results", "Where PNGs go.")
flags.DEFINE_string("step_time_machine", "2-core CPU (shared)",
                    "Machine line for the step-time title (its JSON does not "
                    "record one).")
FLAGS = flags.FLAGS

STYLE = {"baseline": ("tab:gray", "o", "baseline LARS"),
         "sequential": ("tab:blue", "s", "sequential (delay 0)"),
         "conadv": ("tab:red", "^", "ConAdv (delay 1)")}


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _wrap(text, width=110):
  return "\n".join(textwrap.wrap(text, width))


def plot_batch_study(study_path, png_path):
  """Held-out top-1 vs batch size (mean ± std over seeds), one line per
  method, and the train - test gap beside it."""
  plt = _plt()
  with open(study_path) as f:
    study = json.load(f)
  s = study["settings"]
  summary = study["summary"]
  machine = study.get("machine", {})
  fig, (ax, ax_gap) = plt.subplots(
      1, 2, figsize=(12, 6.2), gridspec_kw={"width_ratios": [3, 2]})
  methods = [m for m in STYLE if any(r["method"] == m for r in summary)]
  methods += sorted({r["method"] for r in summary} - set(methods))
  batches = sorted({r["batch_size"] for r in summary})
  n = max(1, len(methods))
  for i, method in enumerate(methods):
    rows = sorted((r for r in summary if r["method"] == method),
                  key=lambda r: r["batch_size"])
    color, marker, label = STYLE.get(method, (None, "x", method))
    # Small multiplicative offsets so error bars do not overlap.
    offset = 1.0 + 0.05 * (i - (n - 1) / 2)
    xs = [r["batch_size"] * offset for r in rows]
    ys = [100 * r["test_top1_mean"] for r in rows]
    es = [100 * (r["test_top1_std"] or 0.0) for r in rows]
    ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, capsize=4,
                label=label, linewidth=1.5)
    for x, y, r in zip(xs, ys, rows):
      ax.annotate(f"{y:.1f} (lr {r['selected_learning_rate']:.3g})", (x, y),
                  textcoords="offset points", xytext=(6, 4 - 10 * i),
                  fontsize=7, color=color)
    ax_gap.errorbar(xs, [100 * r["gap_mean"] for r in rows],
                    yerr=[100 * (r["gap_std"] or 0.0) for r in rows],
                    color=color, marker=marker, capsize=4, label=label,
                    linewidth=1.5)
  labels = [f"{b}\n({s['epochs'] * (s['num_train'] // b)} steps)"
            for b in batches]
  for a in (ax, ax_gap):
    a.set_xscale("log")
    a.set_xticks(batches)
    a.set_xticklabels(labels)
    a.minorticks_off()
    a.grid(True, alpha=0.3)
    a.set_xlabel(f"global batch size (same {s['epochs']}-epoch budget; "
                 f"{s['num_train']} = full batch)", fontsize=8)
  ax.set_ylabel(f"held-out top-1 (%), {s['num_test']} test digits")
  ax.legend(loc="lower left")
  ax_gap.axhline(0, color="black", linewidth=0.8)
  ax_gap.set_ylabel("train - test top-1 (percentage points)")
  ax_gap.set_title("generalization gap (clean train slice, eval mode)",
                   fontsize=9)
  model = (f"ResNet-{s['depth']} w{s['width']}" if s["model"] == "resnet"
           else f"{s['model']} w{s['width']}")
  seeds = min((r["n_seeds"] for r in summary), default=0)
  title = (f"MNIST {s['image_size']}px, {model}, LARS: held-out top-1 vs "
           f"batch size (mean ± std over {seeds} seed"
           f"{'s' if seeds != 1 else ''}; peak lr per point chosen from "
           f"{s['base_lr']:g}*sqrt(B/{s['base_batch']})*m, "
           f"m in {s['lr_multipliers']}, on a {s['num_val']}-digit "
           "validation slice of the training split)")
  sub = (f"{machine.get('cpu_count', '?')}-core CPU "
         f"({machine.get('cpu', '?')}), shared with other jobs; "
         f"{study.get('date', '?')}; wall "
         f"{study.get('wall_seconds', 0) / 60:.1f} min; command: "
         f"{study.get('command', '?')}")
  fig.suptitle(_wrap(title, 130) + "\n" + _wrap(sub, 150), fontsize=9)
  fig.tight_layout()
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
  return png_path


def plot_step_time(step_time_path, png_path, machine="2-core CPU (shared)"):
  """Median step time per mode (min-max whiskers) with the FLOP model."""
  plt = _plt()
  with open(step_time_path) as f:
    data = json.load(f)
  rows = data["rows"]
  modes = [r["mode"] for r in rows]
  med = [r["median_s"] for r in rows]
  lo = [r["median_s"] - r["min_s"] for r in rows]
  hi = [r["max_s"] - r["median_s"] for r in rows]
  base = next((r["median_s"] for r in rows if r["mode"] == "baseline"),
              None)
  fig, ax = plt.subplots(figsize=(8, 5.5))
  colors = ["tab:gray" if m == "baseline" else "tab:red" for m in modes]
  ax.bar(range(len(modes)), med, yerr=[lo, hi], capsize=5, color=colors,
         alpha=0.8, label="measured median (whiskers: min-max)")
  for i, r in enumerate(rows):
    if r.get("ratio_to_baseline"):
      ax.text(i, r["median_s"] / 2, f"{r['ratio_to_baseline']:.2f}x",
              ha="center", color="white", fontsize=10, fontweight="bold")
    if base is not None and r.get("flop_model_ratio"):
      pred = base * r["flop_model_ratio"]
      ax.hlines(pred, i - 0.4, i + 0.4, colors="black", linestyles="--",
                label="FLOP-model prediction" if i == 0 else None)
      ax.text(i, pred, f"FLOP model {r['flop_model_ratio']:.2f}x",
              ha="center", va="bottom", fontsize=7)
  ax.set_xticks(range(len(modes)))
  ax.set_xticklabels(modes)
  ax.set_ylabel("seconds per training step")
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  mtime = datetime.datetime.fromtimestamp(
      os.path.getmtime(step_time_path)).date().isoformat()
  sub = (f"{machine}; JSON file dated {mtime}; command (as its header "
         "implies): python -m benchmarks.step_time --image_size=64 "
         "--batch_size=16 --repeats=10 "
         f"--output={os.path.basename(step_time_path)}")
  ax.set_title(_wrap(data.get("header", "step time"), 100) + "\n" +
               _wrap(sub, 100), fontsize=8.5)
  fig.tight_layout()
  fig.savefig(png_path, dpi=120)
  plt.close(fig)
  return png_path


def main(argv):
  del argv
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  if FLAGS.batch_study:
    print(plot_batch_study(FLAGS.batch_study,
                           os.path.join(FLAGS.out_dir,
                                        "batch_study_top1.png")))
  if FLAGS.step_time:
    print(plot_step_time(FLAGS.step_time,
                         os.path.join(FLAGS.out_dir, "step_time.png"),
                         FLAGS.step_time_machine))


if __name__ == "__main__":
  app.run(main)
