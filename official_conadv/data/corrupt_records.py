"""Corrupt records: never dropped silently, counted when skipped.

A corrupt record (unparsable Example, undecodable image, unreadable file)
fails the pipeline with its location by default (`skip_corrupt=False`):
  InvalidArgumentError: ... Corrupt or unreadable image record: file
  /data/train-00012-of-01024, record index 345 ...
`skip_corrupt=True` drops it, logs its location and counts it in a
`CorruptRecordCounter` (default: the process-wide `CORRUPT_RECORDS`, see
`corrupt_records_skipped()`), which the trainer reports. How: the fallible
decode runs in order behind a top-level `ignore_errors`, each element's
location is kept in a small table until it has passed, and a sequential scan
reports the gaps in k (`guarded_decode`). An unreadable record that never
reached the decode (e.g. a truncated TFRecord file) is reported with an
unknown location and the reader's error is logged. The count is of records
skipped so far, read-ahead (prefetch) included; a corrupt record met in
several epochs counts once per epoch. A skipped record shifts the batch
boundaries after it (training windows then run on into the next records;
eval pads one more image), so a resume across it is not bitwise exact.
"""

import sys
import threading
from typing import Any, List, Tuple

import tensorflow as tf

from official_conadv.data import source as source_lib

_UNKNOWN_FILE = "<unknown>"
_INDEX_SEP = ", record index "


def location_text(file, index):
  """"file F, record index I" as a string tensor."""
  return tf.strings.join(["file ", file, _INDEX_SEP,
                          tf.strings.as_string(index)])


def _parse_location(text: str) -> Tuple[str, int]:
  if not text:
    return _UNKNOWN_FILE, -1
  file, _, index = text[len("file "):].rpartition(_INDEX_SEP)
  return file, int(index)


class CorruptRecordCounter:
  """Counts (and keeps the first locations of) skipped corrupt records.

  Each input pipeline built with `skip_corrupt=True` keeps its own count in
  TF resources (hash tables) on its host, updated in-graph (no Python in the
  pipeline, so it also works where pipelines run on remote TPU hosts);
  `count` and `locations` read and sum them. Read them at any time, e.g. at
  the end of every training loop; reading costs a few small TF ops per
  pipeline built with this counter.
  """

  def __init__(self, max_locations: int = 100):
    self._lock = threading.Lock()
    self._tables: List[Tuple[Any, Any]] = []  # (count, locations) per pipeline
    self.max_locations = max_locations

  def new_pipeline_tables(self):
    """Creates one pipeline's tables (eagerly, on the current device); for
    the input pipeline."""
    count = tf.lookup.experimental.MutableHashTable(
        key_dtype=tf.int64, value_dtype=tf.int64, default_value=0)
    locations = tf.lookup.experimental.MutableHashTable(
        key_dtype=tf.int64, value_dtype=tf.string, default_value="")
    with self._lock:
      self._tables.append((count, locations))
    return count, locations

  @property
  def count(self) -> int:
    with self._lock:
      tables = list(self._tables)
    return int(sum(int(c.lookup(tf.constant(0, tf.int64)))
                   for c, _ in tables))

  def __int__(self):
    return self.count

  @property
  def locations(self) -> List[Tuple[str, int]]:
    """(file, record index) of skipped records, the first `max_locations`
    per pipeline; ("<unknown>", -1) for a record that failed before its
    location was known."""
    with self._lock:
      tables = list(self._tables)
    out = []
    for count, locations in tables:
      n = min(int(count.lookup(tf.constant(0, tf.int64))), self.max_locations)
      if n:
        texts = locations.lookup(tf.range(n, dtype=tf.int64)).numpy()
        out.extend(_parse_location(t.decode("utf-8", "replace"))
                   for t in texts)
    return out

  def reset(self):
    """Forgets every pipeline's counts (the pipelines keep running)."""
    with self._lock:
      tables = list(self._tables)
    for count, locations in tables:
      count.insert(tf.constant([0], tf.int64), tf.constant([0], tf.int64))
      locations.remove(tf.range(self.max_locations, dtype=tf.int64))


CORRUPT_RECORDS = CorruptRecordCounter()


def corrupt_records_skipped() -> int:
  """Corrupt records skipped so far by pipelines using the default counter
  in this process (this worker)."""
  return CORRUPT_RECORDS.count


def _count_skipped(count_table, locations_table, max_locations: int,
                   locations: tf.Tensor) -> tf.Tensor:
  """In-graph: adds len(locations) skipped records to a pipeline's tables and
  logs them; returns the new count."""
  zero = tf.constant([0], tf.int64)
  locations = tf.reshape(locations, [-1])
  before = tf.reshape(count_table.lookup(zero), [])
  n = tf.size(locations, out_type=tf.int64)
  slots = before + tf.range(n)
  keep = slots < max_locations
  shown = tf.where(tf.equal(locations, ""), "unknown location (a read "
                   "error before decoding, logged above)", locations)
  with tf.control_dependencies([
      count_table.insert(zero, tf.reshape(before + n, [1])),
      locations_table.insert(tf.boolean_mask(slots, keep),
                             tf.boolean_mask(locations, keep)),
      tf.print("WARNING: skipped corrupt or unreadable image record(s):",
               shown, "; skipped so far in this pipeline:", before + n,
               output_stream=sys.stderr, summarize=-1)]):
    return before + n


def guarded_decode(ds, plan, src: source_lib.Source, seeds, split_record,
                   first: int, finite: bool):
  """Decodes (k, record) -> (k, image, label, file, index), never dropping a
  failed record silently. `plan`: the pipeline's plan (its `skip_corrupt`,
  and with it `counter`, a CorruptRecordCounter).

  The decode map runs in order (per-op deterministic) and records each
  element's location in a hash table keyed by k before decoding; a top-level
  `ignore_errors` turns a failure into a missing k, and a sequential `scan`
  finds the gaps in k, looks their locations up, and fails (default) or
  counts and logs them (skip_corrupt). Keys are removed as elements pass, so
  the table holds only the elements in flight. A k never inserted (an error
  before the decode map, e.g. a corrupt TFRecord file) is reported with an
  unknown location. Cheaper than catching per element in a nested dataset
  (measured: that costs about 20% of the ImageNet pipeline's throughput).
  """
  table = tf.lookup.experimental.MutableHashTable(
      key_dtype=tf.int64, value_dtype=tf.string, default_value="")
  if plan.skip_corrupt:
    count_table, locations_table = plan.counter.new_pipeline_tables()
  fallback = (tf.zeros([1 if d is None else d for d in src.image_spec.shape],
                       src.image_spec.dtype), tf.constant(-1, tf.int32))

  def decode(k, record):
    file, index, payload = split_record(record)
    with tf.control_dependencies([table.insert(
        tf.reshape(k, [1]), tf.reshape(location_text(file, index), [1]))]):
      k = tf.identity(k)
    if finite:  # The end marker (index -1) is not decoded.
      image, label = tf.cond(
          tf.equal(index, -1), lambda: fallback,
          lambda: src.decode(payload, seeds(k)[0]))
    else:
      image, label = src.decode(payload, seeds(k)[0])
    image = tf.ensure_shape(image, src.image_spec.shape)
    return k, image, tf.cast(label, tf.int32), file, index

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)  # In order: the scan looks for gaps.
  ds = ds.ignore_errors(log_warning=True)

  def check(last, element):
    k = element[0]

    def report():
      locations = table.lookup(tf.range(last + 1, k))
      if plan.skip_corrupt:
        return _count_skipped(count_table, locations_table,
                              plan.counter.max_locations, locations)
      where = tf.strings.reduce_join(tf.where(
          tf.equal(locations, ""),
          "unknown location: an error before decoding, e.g. a corrupt "
          "TFRecord or tfds shard; the error is logged above",
          locations), separator="; ")
      failed = tf.debugging.Assert(False, [tf.strings.join([
          "Corrupt or unreadable image record: ", where,
          f" ({src.name} {src.split}). Fix or remove it, or pass "
          "skip_corrupt=True (data.skip_corrupt) to skip and count such "
          "records."])])
      with tf.control_dependencies([failed]):
        return tf.constant(0, tf.int64)

    reported = tf.cond(k > last + 1, report,
                       lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([reported,
                                  table.remove(tf.range(last + 1, k + 1))]):
      k = tf.identity(k)
    return k, (k,) + tuple(element[1:])

  ds = ds.scan(tf.constant(first - 1, tf.int64), check)
  if finite:
    ds = ds.filter(lambda k, image, label, file, index: index >= 0)
  return ds

