"""Image folders as embedtl reads them: a deterministic scan with splits and labels
(:func:`scan`), robust decoding (:func:`decode_image`) and preprocessing
(:class:`ImageTransform`)."""

from ._decode import (
    DECODER,
    MAX_IMAGE_PIXELS_ENV,
    UNREADABLE,
    content_hash,
    decode_image,
    load_image,
    max_image_pixels,
    read_file,
    read_file_into,
)
from ._scan import ImageEntry, Manifest, read_labels_csv, scan
from ._splits import SPLITS, SplitConfig, assign_splits, stratified_folds
from ._transforms import AugmentTransform, ImageTransform
from ._walk import IMAGE_EXTENSIONS, image_files, is_image_name

__all__ = [
    "DECODER",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS_ENV",
    "SPLITS",
    "UNREADABLE",
    "AugmentTransform",
    "ImageEntry",
    "ImageTransform",
    "Manifest",
    "SplitConfig",
    "assign_splits",
    "content_hash",
    "decode_image",
    "image_files",
    "is_image_name",
    "load_image",
    "max_image_pixels",
    "read_file",
    "read_file_into",
    "read_labels_csv",
    "scan",
    "stratified_folds",
]
