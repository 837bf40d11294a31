r"""Analytic FLOP-and-communication model of the four schedules on a TPU pod.

  python -m benchmarks.pod_model --output=experiments/results/pod_model.json
  python -m benchmarks.pod_model --preset=tpu_v4 --utilization=0.2

Predicts the per-step time of baseline, sequential (delay 0), delayed (stale
weights from a ring buffer) and lookahead (Algorithm 1) training steps of
ResNet-50 on an accelerator pod, from FLOP counts, a gradient all-reduce
model and a few bytes of memory traffic. Nothing here is measured on a pod;
every figure is a prediction from the assumptions below. Pure Python (no
TensorFlow).

Units. One replica = one chip. A TPU v3 or v4 chip has two TensorCores; under
TPUStrategy on v3 each core is a replica with its own HBM, and Cloud slice
names count cores (v3-512 = 256 chips). The model lumps the two cores of a
chip: per-chip batch b = 2 x per-core batch, peak FLOP/s and HBM bandwidth
are per chip, and the reduction between the two cores of a chip is not
counted.

Compute (per chip, per step, per-chip batch b):
  F        forward FLOPs per image. Default 8.18e9 = 2 x 4.09e9
           multiply-adds: ResNet-50 v1.5 (stride on the 3x3 conv) at 224 px,
           convolutions and the dense head only (`resnet50_macs` counts
           4,089,184,256; BN, ReLU, pooling, the loss and the optimizer
           update are not counted). --forward_flops overrides it.
  backward a full training backward (activation + weight gradients) costs
           2F; the attack's backward needs input gradients only, i.e. the
           activation gradients, assumed ~1F (no weight gradients).
  C_base   = 3 F b            baseline: forward + backward.
  C_train  = 6 F b            ConAdv training part: clean and adversarial
                              branch, each forward + backward.
  C_att    = K 2 F b          PGD-K attack: K x (forward + input gradient).
                              The paper uses K = 1 (PGD-1).
  time     = FLOPs / (peak_flops x utilization). Utilization (default 0.5)
           is an assumption, the same for every part; calibrate it against a
           measured MLPerf-class ResNet-50 run on the target pod (the header
           gives the utilization implied by Ying et al. 2018's 1.05M
           images/s on 1,024 TPU v3 chips under this FLOP count: ~0.20).

Gradient all-reduce (sum of the gradients over N chips):
  P        trainable parameters that receive gradients: ResNet-50 main route
           25,557,032 (baseline); the adversarial schedules also reduce the
           adversarial BN's gamma and beta, 53,120 more (25,610,152; the
           repo's `modeling/resnet.py` counts). BN moving statistics are not
           trainable and not reduced.
  G        = P x grad_bytes (default 4: float32 gradients; --grad_bytes=2
           for bfloat16 gradients).
  bandwidth term  2 (N-1)/N x G / (link_bandwidth x links_used): every chip
           must send (and receive) 2 (N-1)/N x G bytes in any all-reduce,
           at most link_bandwidth (one direction) on each link it uses.
           ring: one bidirectional ring through all N chips, links_used = 2.
           torus: a d-dim torus (v3: 2D, v4: 3D), links_used = all 2d links
           of the chip: the gradient is cut into d parts, each
           reduce-scattered along the d dimensions in a rotated order and
           all-gathered back, so every link is busy in every phase. This is
           the bound above; it is reached on a cube-shaped torus and is
           optimistic for elongated shapes.
  latency term    ring: 2 (N-1) x hop_latency (reduce-scatter + all-gather,
           N-1 steps each); torus: 2 x sum_i (n_i - 1) x hop_latency for a
           torus of shape n_1 x ... x n_d (the most cube-like factorization
           of N, `torus_shape`), i.e. ~2 x 2 (sqrt(N) - 1) hops on a square
           2D torus. Every dimension is assumed to wrap around (a torus, not
           a mesh: a mesh axis would take up to 2x longer; not modelled).
  T_ar     = bandwidth term + latency term; --topology picks which model
           the step times use (default torus: TPU v3 pods are 2D tori). Both
           are reported.
  exposed  T_ar_exp = (1 - backward_overlap) x T_ar: the fraction
           --backward_overlap (default 0, i.e. no overlap: an assumption)
           of the all-reduce that the runtime overlaps with the backward
           pass. The same rule applies to every schedule's training part.

Memory traffic extras (time = bytes / hbm_bandwidth; small, shown anyway):
  delayed   writes one copy of the trainable weights into its ring buffer
            and reads one per step: 2 x P x weight_bytes (4, float32
            weights), counted in full (an upper bound: the read may replace
            the attack's own weight read).
  lookahead pushes and pops one (x, x_adv, y) triple of b examples per
            step: 2 x b x (2 x image_bytes + label_bytes); defaults are
            float32 224 px images (602,112 bytes) and one-hot float32 labels
            over 1,000 classes (4,000 bytes), as the repo's queue stores
            them (1,208,224 bytes per example, checked against
            schedules_cpu.json below).
  Neither depends on tau (one slot in, one out per step); tau only sets how
  much memory they hold.

Schedules (the MXU does one thing at a time: compute never overlaps
compute; only communication can overlap with the attack):
  baseline   T = C_base + T_ar_exp(baseline P).
  sequential T = C_att + C_train + T_ar_exp. The attack needs theta_t, i.e.
             the previous step's update, so it cannot start before that
             step's all-reduce ends: nothing is hidden.
  delayed    T = C_att + C_train + max(0, T_ar_exp - C_att) + delayed extras.
  lookahead  T = C_att + C_train + max(0, T_ar_exp - C_att) + lookahead
             extras. In both the attack does not depend on this step's
             update, so the chip runs it while the gradient all-reduce is in
             flight.
  The attack hides the all-reduce when C_att >= T_ar_exp. Saving over
  sequential = min(T_ar_exp, C_att) - memory extras (negative when the
  extras exceed the hidden communication, e.g. on one chip).

Hardware presets (per chip; every field can be overridden by its flag):
  tpu_v3  peak 123e12 bf16 FLOP/s, HBM 900e9 B/s, 2D torus, pod 1,024
          chips (Cloud TPU v3 docs). 4 ICI links per chip (nearest
          neighbours of a 2D torus; "How to Scale Your Model", Austin et
          al. 2025, part 2). Link bandwidth 8.3e10 B/s one way: DERIVED, the
          docs' "all-reduce bandwidth per Pod" of 340 TB/s divided by 1,024
          chips x 4 links (assumption: that figure sums one-way link
          bandwidth; the same derivation gives v4's figure below). The
          scaling book gives 1e11 B/s per link for v3; the lower value is
          used.
  tpu_v4  peak 275e12 bf16 FLOP/s, HBM 1.2e12 B/s, pod 4,096 chips (Cloud
          TPU v4 docs), 3D torus, 6 links per chip, 4.5e10 B/s per link one
          way (scaling book; the docs' 1.1 PB/s all-reduce bandwidth / 4,096
          chips / 6 links = 4.48e10).
  hop_latency 1e-6 s per ICI hop for both: an ASSUMPTION (the scaling
          book's worked example uses about 1 us per hop).

Default table: the paper's global batches 32,768 / 65,536 / 98,304 on
standard TPU v3 slices of 128 / 256 / 512 / 1,024 chips (v3-256 ... v3-2048)
with a per-chip batch of 64 to 256 (96K on 512 and 1,024 chips: 384 or 768
chips would give 256 or 128 per chip but are not v3 slice sizes), plus the
paper's timing study (batch 512 / 1K / 2K on v3-128 / 256 / 512 = 64 / 128 /
256 chips, 8 images per chip); tau = 1, K = 1. The sweep gives, per chip
count and K, the smallest per-chip batch whose attack hides the all-reduce
(C_att >= T_ar_exp), for both topologies.

CPU check: the model's compute ratios (no communication, no memory extras)
against the medians and minima measured on CPU in
experiments/results/schedules_cpu.json (ResNet-50, 64 px, batch 16, PGD-1),
reported as they are; no constant is tuned to them. The memory figures (ring
buffer slot, queue bytes per example) are compared with the bytes measured
there.
"""

import datetime
import json
import math
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES_JSON = "experiments/results/schedules_cpu.json"

SCHEDULES = ("baseline", "sequential", "delayed", "lookahead")
TOPOLOGIES = ("torus", "ring")
# ResNet-50 at 224 px: 2 x 4.09e9 multiply-adds (`resnet50_macs`).
FORWARD_FLOPS = 8.18e9
# ResNet-50 main route (tf-models-official's count) and the adversarial
# BN's gamma + beta (official_conadv/modeling/resnet.py).
RESNET50_PARAMS = 25_557_032
ADV_BN_PARAMS = 53_120
IMAGE_BYTES = 224 * 224 * 3 * 4  # float32 224 px image
LABEL_BYTES = 1000 * 4  # one-hot float32 over 1,000 classes
# Ying et al. 2018 (docs/benchmarks.md): over 1.05M images/s on a 1,024-chip TPU v3 pod.
YING_2018_IMAGES_PER_S_PER_CHIP = 1.05e6 / 1024

PRESETS = {
    "tpu_v3": {
        "peak_flops": 123e12,
        "hbm_bandwidth": 900e9,
        "link_bandwidth": 8.3e10,
        "links": 4,
        "torus_dims": 2,
        "hop_latency": 1e-6,
        "max_chips": 1024,
        "cores_per_chip": 2,
        "sources": {
            "peak_flops, hbm_bandwidth, torus_dims, max_chips":
                "Cloud TPU v3 docs (system architecture table)",
            "links": "scaling book ('How to Scale Your Model', part 2): "
                     "v3 chips link to their 4 nearest neighbours (2D torus)",
            "link_bandwidth": "derived (assumption): Cloud TPU v3 docs' "
                              "all-reduce bandwidth per Pod 340 TB/s / "
                              "(1,024 chips x 4 links) = 8.3e10 B/s one way; "
                              "the scaling book gives 1e11",
            "hop_latency": "assumption (~1 us per hop, scaling book's "
                           "worked example)",
        },
    },
    "tpu_v4": {
        "peak_flops": 275e12,
        "hbm_bandwidth": 1.2e12,
        "link_bandwidth": 4.5e10,
        "links": 6,
        "torus_dims": 3,
        "hop_latency": 1e-6,
        "max_chips": 4096,
        "cores_per_chip": 2,
        "sources": {
            "peak_flops, hbm_bandwidth, max_chips":
                "Cloud TPU v4 docs (system architecture table)",
            "links, torus_dims": "scaling book: 6 nearest neighbours (3D "
                                 "torus on full-cube slices)",
            "link_bandwidth": "scaling book: 4.5e10 B/s one way per link "
                              "(Cloud docs' all-reduce bandwidth per Pod "
                              "1.1 PB/s / (4,096 x 6) = 4.48e10)",
            "hop_latency": "assumption (~1 us per hop, scaling book's "
                           "worked example)",
        },
    },
}
HARDWARE_FIELDS = ("peak_flops", "hbm_bandwidth", "link_bandwidth", "links",
                   "torus_dims", "hop_latency")

# (global batch, chips): the paper's batches on standard v3 slices, then the
# paper's timing study (batch 512 / 1K / 2K on v3-128 / 256 / 512).
DEFAULT_ROWS = ("32768x128", "32768x256", "32768x512", "65536x256",
                "65536x512", "65536x1024", "98304x512", "98304x1024",
                "512x64", "1024x128", "2048x256")
TIMING_STUDY = {(512, 64), (1024, 128), (2048, 256)}
DEFAULT_SWEEP_CHIPS = (8, 32, 128, 256, 512, 1024)
DEFAULT_SWEEP_PGD_STEPS = (1, 2, 3, 5, 10)
MS = 1e3


def define_flags():
  """Defined only when run as a script (as `resume_cost.py`), so importing
  this module next to other benchmarks defines no flags."""
  flags.DEFINE_enum("preset", "tpu_v3", sorted(PRESETS), "Hardware preset.")
  flags.DEFINE_float("peak_flops", None, "Override: peak FLOP/s per chip.")
  flags.DEFINE_float("hbm_bandwidth", None, "Override: HBM bytes/s per chip.")
  flags.DEFINE_float("link_bandwidth", None,
                     "Override: one-way bytes/s of one ICI link.")
  flags.DEFINE_integer("links", None, "Override: ICI links per chip.")
  flags.DEFINE_integer("torus_dims", None, "Override: torus dimensions.")
  flags.DEFINE_float("hop_latency", None, "Override: seconds per ICI hop.")
  flags.DEFINE_float("utilization", 0.5,
                     "Fraction of peak FLOP/s reached (an assumption).")
  flags.DEFINE_float("forward_flops", FORWARD_FLOPS,
                     "Forward FLOPs per image (ResNet-50, 224 px).")
  flags.DEFINE_integer("params", RESNET50_PARAMS,
                       "Trainable parameters of the baseline network.")
  flags.DEFINE_integer("adv_bn_params", ADV_BN_PARAMS,
                       "Extra trainable parameters of the adversarial BN.")
  flags.DEFINE_integer("grad_bytes", 4, "Bytes per reduced gradient value.")
  flags.DEFINE_integer("weight_bytes", 4,
                       "Bytes per weight in the delayed ring buffer.")
  flags.DEFINE_integer("image_bytes", IMAGE_BYTES,
                       "Bytes per image in the lookahead queue.")
  flags.DEFINE_integer("label_bytes", LABEL_BYTES,
                       "Bytes per label in the lookahead queue.")
  flags.DEFINE_float("backward_overlap", 0.0,
                     "Fraction of the all-reduce overlapped with the "
                     "backward pass (every schedule).")
  flags.DEFINE_enum("topology", "torus", list(TOPOLOGIES),
                    "All-reduce model the step times use.")
  flags.DEFINE_integer("pgd_steps", 1, "K, PGD steps of the attack.")
  flags.DEFINE_integer("tau", 1, "Delay (reported; the time model does not "
                       "depend on it).")
  flags.DEFINE_list("rows", list(DEFAULT_ROWS),
                    "Table rows, GLOBALBATCHxCHIPS.")
  flags.DEFINE_list("sweep_chips", [str(n) for n in DEFAULT_SWEEP_CHIPS],
                    "Chip counts of the hiding-threshold sweep.")
  flags.DEFINE_list("sweep_pgd_steps",
                    [str(k) for k in DEFAULT_SWEEP_PGD_STEPS],
                    "PGD steps K of the hiding-threshold sweep.")
  flags.DEFINE_string("schedules_json", SCHEDULES_JSON,
                      "Measured CPU figures (relative to the repo root or "
                      "absolute); empty to skip the CPU check.")
  flags.DEFINE_string("output", None, "JSON output path.")


def resnet50_macs(image_size=224, num_classes=1000):
  """Multiply-adds of ResNet-50 v1.5's convolutions and dense head.

  'same' padding, stride 2 on the 7x7 stem, the 3x3 max pool, the 3x3 conv
  of each stage's first block and its 1x1 projection; BN, ReLU, pooling and
  additions are not counted.
  """
  def conv(size, cin, cout, kernel, stride):
    out = -(-size // stride)
    return out, out * out * cin * cout * kernel * kernel

  size, total = conv(image_size, 3, 64, 7, 2)
  size = -(-size // 2)
  cin = 64
  for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2),
                                (512, 3, 2)):
    for i in range(blocks):
      s = stride if i == 0 else 1
      total += conv(size, cin, width, 1, 1)[1]
      out, macs = conv(size, width, width, 3, s)
      total += macs + conv(out, width, 4 * width, 1, 1)[1]
      if i == 0:
        total += conv(size, cin, 4 * width, 1, s)[1]
      size, cin = out, 4 * width
  return total + cin * num_classes


def hardware(preset="tpu_v3", **overrides):
  """The preset's HARDWARE_FIELDS with the non-None `overrides` applied."""
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; known: {sorted(PRESETS)}.")
  unknown = set(overrides) - set(HARDWARE_FIELDS)
  if unknown:
    raise ValueError(f"Unknown hardware fields {sorted(unknown)}.")
  hw = {k: PRESETS[preset][k] for k in HARDWARE_FIELDS}
  hw.update({k: v for k, v in overrides.items() if v is not None})
  return hw


def torus_shape(chips, dims):
  """The most cube-like n_1 <= ... <= n_d with product `chips`."""
  if chips < 1 or dims < 1:
    raise ValueError(f"chips and dims must be >= 1, got {chips}, {dims}.")
  if dims == 1:
    return (chips,)
  side = max(d for d in range(1, chips + 1) if chips % d == 0 and
             d ** dims <= chips)
  return (side,) + torus_shape(chips // side, dims - 1)


def allreduce_time(nbytes, chips, hw, topology="torus"):
  """Seconds of an all-reduce of `nbytes` over `chips` (module docstring).

  Returns:
    (seconds, {"bandwidth_s", "latency_s", "hops", "links_used", "shape"}).
  """
  if topology not in TOPOLOGIES:
    raise ValueError(f"topology must be one of {TOPOLOGIES}, got "
                     f"{topology!r}.")
  if topology == "ring":
    links, hops, shape = 2, 2 * (chips - 1), (chips,)
  else:
    links = hw["links"]
    shape = torus_shape(chips, hw["torus_dims"])
    hops = 2 * sum(n - 1 for n in shape)
  bandwidth = (2 * (chips - 1) / chips * nbytes /
               (hw["link_bandwidth"] * links))
  latency = hops * hw["hop_latency"]
  return bandwidth + latency, {"bandwidth_s": bandwidth, "latency_s": latency,
                               "hops": hops, "links_used": links,
                               "shape": list(shape)}


def compute_times(per_chip_batch, hw, utilization=0.5,
                  forward_flops=FORWARD_FLOPS, pgd_steps=1):
  """Seconds of the baseline, attack and ConAdv training part on one chip."""
  rate = hw["peak_flops"] * utilization
  fb = forward_flops * per_chip_batch
  return {"baseline": 3 * fb / rate, "attack": pgd_steps * 2 * fb / rate,
          "train_part": 6 * fb / rate}


def memory_extras(per_chip_batch, hw, params=RESNET50_PARAMS + ADV_BN_PARAMS,
                  weight_bytes=4, image_bytes=IMAGE_BYTES,
                  label_bytes=LABEL_BYTES):
  """Extra HBM bytes and seconds per step of delayed and lookahead."""
  nbytes = {"delayed": 2 * params * weight_bytes,
            "lookahead": 2 * per_chip_batch * (2 * image_bytes +
                                               label_bytes)}
  return nbytes, {k: v / hw["hbm_bandwidth"] for k, v in nbytes.items()}


def step_times(compute, allreduce_exposed_base, allreduce_exposed, extras):
  """Seconds per step of the four schedules (module docstring)."""
  attack, train = compute["attack"], compute["train_part"]
  hidden_rest = max(0.0, allreduce_exposed - attack)
  return {
      "baseline": compute["baseline"] + allreduce_exposed_base,
      "sequential": attack + train + allreduce_exposed,
      "delayed": attack + train + hidden_rest + extras["delayed"],
      "lookahead": attack + train + hidden_rest + extras["lookahead"],
  }


def predict(global_batch, chips, hw, *, utilization=0.5,
            forward_flops=FORWARD_FLOPS, params=RESNET50_PARAMS,
            adv_bn_params=ADV_BN_PARAMS, grad_bytes=4, weight_bytes=4,
            image_bytes=IMAGE_BYTES, label_bytes=LABEL_BYTES,
            backward_overlap=0.0, topology="torus", pgd_steps=1, tau=1,
            cores_per_chip=2, slice_prefix="v3"):
  """One table row (times in ms, bytes as integers)."""
  if global_batch % chips:
    raise ValueError(f"global batch {global_batch} is not a multiple of "
                     f"{chips} chips.")
  if not 0.0 <= backward_overlap <= 1.0:
    raise ValueError(f"backward_overlap must be in [0, 1], got "
                     f"{backward_overlap}.")
  b = global_batch // chips
  compute = compute_times(b, hw, utilization, forward_flops, pgd_steps)
  adv_params = params + adv_bn_params
  g_base, g_adv = params * grad_bytes, adv_params * grad_bytes
  ar = {t: allreduce_time(g_adv, chips, hw, t) for t in TOPOLOGIES}
  t_ar = ar[topology][0]
  t_ar_base = allreduce_time(g_base, chips, hw, topology)[0]
  exposed = (1 - backward_overlap) * t_ar
  exposed_base = (1 - backward_overlap) * t_ar_base
  extra_bytes, extras = memory_extras(b, hw, adv_params, weight_bytes,
                                      image_bytes, label_bytes)
  steps = step_times(compute, exposed_base, exposed, extras)
  seq = steps["sequential"]
  return {
      "global_batch": global_batch,
      "chips": chips,
      "slice": f"{slice_prefix}-{cores_per_chip * chips}",
      "per_chip_batch": b,
      "paper_timing_study": (global_batch, chips) in TIMING_STUDY,
      "tau": tau,
      "pgd_steps": pgd_steps,
      "compute_ms": {k: v * MS for k, v in compute.items()},
      "allreduce": {
          "bytes_baseline": g_base,
          "bytes_adversarial": g_adv,
          "torus_shape": ar["torus"][1]["shape"],
          "torus_ms": ar["torus"][0] * MS,
          "torus_latency_ms": ar["torus"][1]["latency_s"] * MS,
          "ring_ms": ar["ring"][0] * MS,
          "ring_latency_ms": ar["ring"][1]["latency_s"] * MS,
          "topology": topology,
          "t_ar_ms": t_ar * MS,
          "t_ar_baseline_ms": t_ar_base * MS,
          "exposed_ms": exposed * MS,
          "exposed_baseline_ms": exposed_base * MS,
          # From the ms figures, so it equals max(0, exposed - C_att) as
          # reported.
          "exposed_after_attack_ms": max(0.0, exposed * MS -
                                         compute["attack"] * MS),
      },
      "memory_extra_bytes": extra_bytes,
      "memory_extra_ms": {k: v * MS for k, v in extras.items()},
      "step_ms": {k: v * MS for k, v in steps.items()},
      "ratio_to_baseline": {k: v / steps["baseline"]
                            for k, v in steps.items()},
      "attack_hides_allreduce": compute["attack"] >= exposed,
      "saving_vs_sequential_ms": {k: (seq - steps[k]) * MS
                                  for k in ("delayed", "lookahead")},
      "saving_vs_sequential_fraction": {k: (seq - steps[k]) / seq
                                        for k in ("delayed", "lookahead")},
  }


def min_hiding_batch(exposed_s, attack_s_per_image):
  """Smallest integer per-chip batch b with b x attack_s_per_image >=
  exposed_s (1 when there is nothing to hide)."""
  b = max(1, math.ceil(exposed_s / attack_s_per_image))
  while b > 1 and (b - 1) * attack_s_per_image >= exposed_s:
    b -= 1
  return b


def sweep(chip_counts, pgd_steps_list, hw, *, utilization=0.5,
          forward_flops=FORWARD_FLOPS, params=RESNET50_PARAMS,
          adv_bn_params=ADV_BN_PARAMS, grad_bytes=4, backward_overlap=0.0):
  """Per (chips, K): the all-reduce and the smallest per-chip batch whose
  attack hides it, for both topologies."""
  g = (params + adv_bn_params) * grad_bytes
  rows = []
  for chips in chip_counts:
    exposed = {t: (1 - backward_overlap) * allreduce_time(g, chips, hw, t)[0]
               for t in TOPOLOGIES}
    for k in pgd_steps_list:
      per_image = compute_times(1, hw, utilization, forward_flops,
                                k)["attack"]
      rows.append({
          "chips": chips, "pgd_steps": k,
          "attack_ms_per_image": per_image * MS,
          "exposed_torus_ms": exposed["torus"] * MS,
          "exposed_ring_ms": exposed["ring"] * MS,
          "min_per_chip_batch_torus": min_hiding_batch(exposed["torus"],
                                                       per_image),
          "min_per_chip_batch_ring": min_hiding_batch(exposed["ring"],
                                                      per_image),
      })
  return rows


def _timing(measured, name):
  for row in measured["timing"]:
    if row["candidate"] == name:
      return row
  raise KeyError(f"{name!r} not in the measured timing rows.")


def cpu_check(measured, *, params=RESNET50_PARAMS,
              adv_bn_params=ADV_BN_PARAMS, weight_bytes=4,
              image_bytes=IMAGE_BYTES, label_bytes=LABEL_BYTES, source=None):
  """Model compute ratios (no communication, no memory traffic) against
  `measured` (the JSON of `benchmarks.schedules`), and the model's bytes
  against the measured buffer and queue."""
  k = 1  # the CPU run's attack: AttackConfig's default, PGD-1
  units = {"baseline": 3.0, "attack": 2.0 * k, "train_part": 6.0}
  for name in ("sequential", "delayed", "lookahead"):
    units[name] = units["attack"] + units["train_part"]
  pairs = (("attack", "train_part"), ("attack", "baseline"),
           ("train_part", "baseline"), ("sequential", "baseline"),
           ("delayed", "baseline"), ("lookahead", "baseline"),
           ("delayed", "sequential"), ("lookahead", "sequential"))
  rows = []
  for num, den in pairs:
    n, d = _timing(measured, num), _timing(measured, den)
    rows.append({"ratio": f"{num} / {den}", "model": units[num] / units[den],
                 "measured_medians": n["median_s"] / d["median_s"],
                 "measured_minima": n["min_s"] / d["min_s"]})
  overlap = measured["overlap"]
  rows.append({"ratio": "lookahead / (attack + train_part)", "model": 1.0,
               "measured_medians":
                   overlap["from_medians"]["lookahead_over_sum"],
               "measured_minima":
                   overlap["from_minima"]["lookahead_over_sum"]})
  memory = []
  mem = measured.get("memory")
  if mem:
    slot = mem["break_even"]["one_hot"]["buffer_bytes_per_tau"]
    per_example = mem["break_even"]["one_hot"][
        "queue_bytes_per_example_per_tau"]
    memory = [
        {"quantity": "ring buffer bytes per slot (P x weight_bytes)",
         "model": (params + adv_bn_params) * weight_bytes,
         "measured": slot},
        {"quantity": "queue bytes per example (2 images + one-hot label)",
         "model": 2 * image_bytes + label_bytes,
         "measured": per_example},
    ]
  return {"source": source, "measured_header": measured.get("header"),
          "note": "Model: FLOP ratios in forward units (baseline 3, attack "
                  "2K with K = 1, training part 6); no communication, no "
                  "memory traffic on CPU. Measured: the JSON's medians and "
                  "minima, as they are.",
          "ratios": rows, "memory": memory}


def implied_utilization(images_per_s_per_chip, peak_flops,
                        forward_flops=FORWARD_FLOPS):
  """Utilization at which C_base alone gives this baseline throughput."""
  return images_per_s_per_chip * 3 * forward_flops / peak_flops


def _parse_rows(rows):
  parsed = []
  for row in rows:
    batch, _, chips = str(row).lower().partition("x")
    if not chips:
      raise ValueError(f"Row {row!r} is not GLOBALBATCHxCHIPS.")
    parsed.append((int(batch), int(chips)))
  return parsed


def _load_measured(path):
  if not path:
    return None, None
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.exists(full):
    return None, path
  with open(full) as f:
    return json.load(f), path


def run(preset="tpu_v3", utilization=0.5, forward_flops=FORWARD_FLOPS,
        params=RESNET50_PARAMS, adv_bn_params=ADV_BN_PARAMS, grad_bytes=4,
        weight_bytes=4, image_bytes=IMAGE_BYTES, label_bytes=LABEL_BYTES,
        backward_overlap=0.0, topology="torus", pgd_steps=1, tau=1,
        rows=DEFAULT_ROWS, sweep_chips=DEFAULT_SWEEP_CHIPS,
        sweep_pgd_steps=DEFAULT_SWEEP_PGD_STEPS,
        schedules_json=SCHEDULES_JSON, output=None, verbose=True,
        **hw_overrides):
  """Builds the table, the sweep and the CPU check; returns the JSON dict.

  Args mirror the flags (module docstring); `hw_overrides` are the
  non-None HARDWARE_FIELDS flags.

  Returns:
    {"header", "rows", "sweep", "cpu_check"}.
  """
  if utilization <= 0 or pgd_steps < 1:
    raise ValueError(f"utilization must be > 0 and pgd_steps >= 1, got "
                     f"{utilization}, {pgd_steps}.")
  hw = hardware(preset, **hw_overrides)
  max_chips = PRESETS[preset]["max_chips"]
  kwargs = dict(utilization=utilization, forward_flops=forward_flops,
                params=params, adv_bn_params=adv_bn_params,
                grad_bytes=grad_bytes, backward_overlap=backward_overlap)
  table = []
  for batch, chips in _parse_rows(rows):
    if chips > max_chips:
      raise ValueError(f"{chips} chips exceed a {preset} pod "
                       f"({max_chips}).")
    table.append(predict(
        batch, chips, hw, weight_bytes=weight_bytes, image_bytes=image_bytes,
        label_bytes=label_bytes, topology=topology, pgd_steps=pgd_steps,
        tau=tau, cores_per_chip=PRESETS[preset]["cores_per_chip"],
        slice_prefix=preset.split("_")[-1], **kwargs))
  sweep_rows = sweep([int(n) for n in sweep_chips],
                     [int(k) for k in sweep_pgd_steps], hw, **kwargs)
  measured, source = _load_measured(schedules_json)
  check = None if measured is None else cpu_check(
      measured, params=params, adv_bn_params=adv_bn_params,
      weight_bytes=weight_bytes, image_bytes=image_bytes,
      label_bytes=label_bytes, source=source)
  header = {
      "title": "Analytic pod model of the ConAdv schedules (predictions, "
               "not measurements)",
      "date": datetime.date.today().isoformat(),
      "preset": preset,
      "hardware": hw,
      "presets": PRESETS,
      "config": {"utilization": utilization, "forward_flops": forward_flops,
                 "params_baseline": params, "adv_bn_params": adv_bn_params,
                 "grad_bytes": grad_bytes, "weight_bytes": weight_bytes,
                 "image_bytes": image_bytes, "label_bytes": label_bytes,
                 "backward_overlap": backward_overlap, "topology": topology,
                 "pgd_steps": pgd_steps, "tau": tau},
      "resnet50_macs_224px": resnet50_macs(),
      "calibration_reference": {
          "source": "Ying et al. 2018 (README): over 1.05M images/s on a "
                    "1,024-chip TPU v3 pod",
          "images_per_s_per_chip": YING_2018_IMAGES_PER_S_PER_CHIP,
          "implied_utilization_tpu_v3": implied_utilization(
              YING_2018_IMAGES_PER_S_PER_CHIP, PRESETS["tpu_v3"]["peak_flops"],
              forward_flops),
          "note": "Compute only (communication and input ignored); an MLPerf "
                  "ResNet-50 result on the target pod is the reference to "
                  "calibrate --utilization against.",
      },
      "assumptions": [
          "One replica = one chip (2 TensorCores lumped); slice names count "
          "cores.",
          "F = forward FLOPs per image = 2 x 4.09e9 multiply-adds (ResNet-50 "
          "v1.5, 224 px, convs + dense).",
          "Training backward = 2F (activation + weight gradients); the "
          "attack's input-gradient backward = 1F.",
          "C_base = 3Fb, C_train = 6Fb, C_att = 2KFb; time = FLOPs / (peak x "
          "utilization), utilization an assumption (default 0.5).",
          "All-reduce of trainable parameters that receive gradients "
          "(adversarial BN included for the adversarial schedules; BN "
          "statistics excluded) at grad_bytes per value.",
          "All-reduce: 2(N-1)/N x G / (link_bandwidth x links_used) + hops x "
          "hop_latency; ring: 2 links, 2(N-1) hops; torus: all links, "
          "2 sum(n_i - 1) hops over the most cube-like shape; every axis "
          "wraps around.",
          "Exposed all-reduce = (1 - backward_overlap) x T_ar, the same rule "
          "for every schedule; backward_overlap default 0.",
          "Compute never overlaps compute; only the all-reduce overlaps with "
          "the attack, and only in delayed and lookahead.",
          "Memory extras at HBM bandwidth, added in full: delayed 2 x P x "
          "weight_bytes, lookahead 2 x b x (2 image_bytes + label_bytes).",
          "Link bandwidth of v3 derived from the Cloud docs' all-reduce "
          "bandwidth per Pod; hop latency 1 us assumed.",
      ],
  }
  result = {"header": header, "rows": table, "sweep": sweep_rows,
            "cpu_check": check}
  if verbose:
    print_tables(result)
  write_json(result, output)
  return result


def write_json(result, output):
  """Writes `result` to `output` (creating its folder); None: no file."""
  if not output:
    return
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")


def _print_rows(rows, topology):
  print(f"{'batch':>6} {'chips':>5} {'b':>4} | {'C_base':>7} {'C_att':>6} "
        f"{'C_train':>7} {'T_ar':>5} {'(ring)':>6} | {'base':>6} "
        f"{'seq':>6} {'delay':>6} {'look':>6} | {'seq/b':>5} {'del/b':>5} "
        f"{'look/b':>6} | {'hides':>5} {'save del':>8} {'save look':>9}")
  for r in rows:
    c, s, q = r["compute_ms"], r["step_ms"], r["ratio_to_baseline"]
    save = r["saving_vs_sequential_ms"]
    mark = "*" if r["paper_timing_study"] else " "
    print(f"{r['global_batch']:>6}{mark}{r['chips']:>5} "
          f"{r['per_chip_batch']:>4} | {c['baseline']:7.2f} "
          f"{c['attack']:6.2f} {c['train_part']:7.2f} "
          f"{r['allreduce']['t_ar_ms']:5.2f} {r['allreduce']['ring_ms']:6.2f} "
          f"| {s['baseline']:6.2f} {s['sequential']:6.2f} "
          f"{s['delayed']:6.2f} {s['lookahead']:6.2f} | "
          f"{q['sequential']:5.3f} {q['delayed']:5.3f} {q['lookahead']:6.3f} "
          f"| {str(r['attack_hides_allreduce']):>5} {save['delayed']:8.3f} "
          f"{save['lookahead']:9.3f}")
  print(f"(ms; T_ar: {topology} model used for the step times, ring shown "
        f"for comparison; * the paper's timing study; saving = sequential - "
        f"schedule)")


def print_tables(result):
  """Prints the table, the sweep and the CPU check of a `run` result."""
  h = result["header"]
  cfg = h["config"]
  print(f"{h['title']}; {h['preset']}, utilization {cfg['utilization']}, "
        f"K = {cfg['pgd_steps']}, tau = {cfg['tau']}, grad bytes "
        f"{cfg['grad_bytes']}, backward overlap {cfg['backward_overlap']}")
  _print_rows(result["rows"], cfg["topology"])
  print("Smallest per-chip batch whose attack hides the all-reduce "
        "(C_att >= T_ar exposed):")
  print(f"{'chips':>5} {'K':>3} {'att ms/img':>10} {'T_ar torus':>10} "
        f"{'T_ar ring':>9} {'b torus':>7} {'b ring':>6}")
  for r in result["sweep"]:
    print(f"{r['chips']:>5} {r['pgd_steps']:>3} "
          f"{r['attack_ms_per_image']:10.4f} {r['exposed_torus_ms']:10.3f} "
          f"{r['exposed_ring_ms']:9.3f} {r['min_per_chip_batch_torus']:>7} "
          f"{r['min_per_chip_batch_ring']:>6}")
  ref = h["calibration_reference"]
  print(f"Calibration reference: {ref['images_per_s_per_chip']:.0f} "
        f"images/s per v3 chip implies utilization "
        f"{ref['implied_utilization_tpu_v3']:.3f} under this FLOP count")
  check = result["cpu_check"]
  if check is None:
    print("CPU check skipped (no measured JSON).")
    return
  print(f"CPU check against {check['source']} ({check['measured_header']}):")
  print(f"{'ratio':<36} {'model':>6} {'median':>7} {'min':>6}")
  for r in check["ratios"]:
    print(f"{r['ratio']:<36} {r['model']:6.3f} {r['measured_medians']:7.3f} "
          f"{r['measured_minima']:6.3f}")
  for m in check["memory"]:
    print(f"{m['quantity']}: model {m['model']:,}, measured "
          f"{m['measured']:,.0f}")


def main(argv):
  del argv
  overrides = {k: FLAGS[k].value for k in HARDWARE_FIELDS}
  run(preset=FLAGS.preset, utilization=FLAGS.utilization,
      forward_flops=FLAGS.forward_flops, params=FLAGS.params,
      adv_bn_params=FLAGS.adv_bn_params, grad_bytes=FLAGS.grad_bytes,
      weight_bytes=FLAGS.weight_bytes, image_bytes=FLAGS.image_bytes,
      label_bytes=FLAGS.label_bytes, backward_overlap=FLAGS.backward_overlap,
      topology=FLAGS.topology, pgd_steps=FLAGS.pgd_steps, tau=FLAGS.tau,
      rows=FLAGS.rows, sweep_chips=FLAGS.sweep_chips,
      sweep_pgd_steps=FLAGS.sweep_pgd_steps,
      schedules_json=FLAGS.schedules_json, output=FLAGS.output,
      **overrides)


if __name__ == "__main__":
  define_flags()
  app.run(main)
