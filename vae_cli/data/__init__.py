"""Images in, tensors out: the dataset registry (`base.py`), one module per dataset family, image-file
decoding (`images.py`), streaming from disk (`streaming.py`) and batched augmentation (`augment.py`).

A new dataset is one module with `@register_dataset("name")` and one import line below.
"""

from vae_cli.data.base import (
    DATASETS,
    LEVELS,
    SPLIT_SEED,
    Dataset,
    build_dataset,
    class_mixed,
    conform,
    labelled_subset,
    register_dataset,
    stratified_split,
    take_rows,
)

# Importing a dataset module registers it.
from vae_cli.data import digits, folder, torchvision_sets  # noqa: E402,F401  isort: skip

__all__ = ["DATASETS", "LEVELS", "SPLIT_SEED", "Dataset", "build_dataset", "class_mixed", "conform", "labelled_subset",
           "register_dataset", "stratified_split", "take_rows"]
