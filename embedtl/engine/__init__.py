"""The extraction engine: frozen backbone, run once, batched, streaming into the feature store.

One engine does every extraction in embedtl (:func:`extract`; :func:`embed_files` for loose
files, :func:`extract_distributed` under torchrun):

1. resolve the backbone spec and its fingerprint (hashes the weights file; builds nothing);
2. scan the folder; compare with the store and with the journal of an interrupted run
   (:mod:`._plan`);
3. if every file is already there unchanged: done -- no model is built, no image decoded;
4. otherwise build the model once (a runtime from :mod:`embedtl.runtime`: PyTorch in ``eval()``
   under ``torch.inference_mode()``, channels_last, autocast on CUDA checked against float32;
   or ONNX Runtime on CPU) and stream the missing files through it (:mod:`._stream`):
   the input pipeline's threads read, hash and decode the next batches meanwhile
   (:mod:`._pipeline`: one buffer per batch, decoded into a preallocated batch array; on CUDA
   they only read JPEGs, which nvJPEG decodes on the GPU in a producer thread of its own:
   :mod:`embedtl.tensor_decode`; fine-tuning's training images go through a DataLoader,
   :mod:`._loader`);
   a CUDA batch is collected after the next one is launched; finished rows go to the journal
   on a writer thread;
5. fold store + journal into a new store file, sorted by path, swapped in atomically.

How the model runs is one frozen :class:`EngineOptions` record; how a folder's store is
labelled, split and written, one :class:`StoreOptions`.
"""

from .._device import resolve_device
from .._dist import torchrun_rank
from ._distributed import extract_distributed
from ._embedder import Embedder
from ._entry import extract
from ._extract import Embedded, ExtractStats, embed_files, open_source
from ._loader import Batch, ImageDataset, Item, collate, make_loader
from ._options import (
    CUDA_BATCH,
    EngineOptions,
    StoreOptions,
    default_batch_size,
    default_threads,
    default_workers,
)

__all__ = [
    "CUDA_BATCH",
    "Batch",
    "Embedded",
    "Embedder",
    "EngineOptions",
    "StoreOptions",
    "ExtractStats",
    "ImageDataset",
    "Item",
    "collate",
    "default_batch_size",
    "default_threads",
    "default_workers",
    "embed_files",
    "extract",
    "extract_distributed",
    "make_loader",
    "open_source",
    "resolve_device",
    "torchrun_rank",
]
