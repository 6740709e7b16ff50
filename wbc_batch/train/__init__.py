"""Training of the default models (and fine-tuning on a lab's own images).

`segmenter.train_segmenter(...)` and `classifier.train_classifier(...)` take plain dataclasses;
`plugins/train_command.py` exposes them as `wbc-batch train segmenter|classifier`.
Datasets are read in their published layouts by `datasets.py`.
"""
