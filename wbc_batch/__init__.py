"""wbc-batch: find, segment and classify white blood cells in blood-smear images, in batches."""

__version__ = "0.1.0"

#: The five classes, in the order of every probability vector and report column.
CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
