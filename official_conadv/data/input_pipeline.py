"""The input pipeline's one entry point: every public name of the data layer.

    data = input_pipeline.DataSource(config.data)   # The trainer's way.
    ds = input_pipeline.distributed_dataset(strategy, config.data,
                                            split="train", is_training=True,
                                            global_batch_size=4096)
    ds = input_pipeline.build_dataset("imagenet_tfrecord", "train", ...)

Where each part lives (open these to read how):
  pipeline.py         make_dataset_fn / build_dataset: the pipeline every
                      dataset shares (epochs, seeds, augment, eval padding,
                      batching); its docstring describes the stream
  epochs.py           which records a pipeline reads at which step: the
                      batch layout, the epoch stream, the eval pass size
  corrupt_records.py  the corrupt-record guard and CorruptRecordCounter
  registry.py         the datasets by name (the one dispatch on the name)
  datasource.py       DataSource (a config's dataset resolved once),
                      distributed datasets, input pipelines per strategy,
                      throughput
  source.py           what a dataset module hands the pipeline (`Source`)
"""

from official_conadv.data import corrupt_records
from official_conadv.data import datasource
from official_conadv.data import epochs
from official_conadv.data import pipeline
from official_conadv.data import registry

# corrupt_records.py
CORRUPT_RECORDS = corrupt_records.CORRUPT_RECORDS
corrupt_records_skipped = corrupt_records.corrupt_records_skipped
CorruptRecordCounter = corrupt_records.CorruptRecordCounter
# datasource.py
DataSource = datasource.DataSource
distributed_dataset = datasource.distributed_dataset
measure_throughput = datasource.measure_throughput
num_input_pipelines = datasource.num_input_pipelines
# epochs.py
check_batch_size = epochs.check_batch_size
num_eval_steps = epochs.num_eval_steps
# pipeline.py
build_dataset = pipeline.build_dataset
make_dataset_fn = pipeline.make_dataset_fn
# registry.py
check_data = registry.check_data
DATASETS = registry.DATASETS
image_shape = registry.image_shape
make_source = registry.make_source
num_classes = registry.num_classes
num_examples = registry.num_examples
