"""Fine-tune: a backbone and its trained head, trained end to end, become a new backbone.

:func:`fine_tune` makes the tutorials' advice one call (train the head first on cached features,
then unfreeze the last block(s) at a much smaller learning rate and train briefly):

1. the head artifact (linear, mlp or logreg) names its backbone; the parent store of the image
   folder (extracted on a miss) gives the rows, labels and splits, and the **before** accuracies;
2. backbone + head as one network, starting from the trained head (head-first: training starts
   at the head's accuracy, not at chance). All but the last N blocks are frozen and their
   BatchNorm layers stay in eval mode, so their running statistics never move. Training-time
   augmentation (random resized crop, flip) precedes the weights' own normalisation. AdamW with
   discriminative learning rates, warm-up then cosine, AMP on CUDA. Val accuracy every epoch,
   the best epoch kept, early stopping. The test split is not read while training;
3. a checkpoint in the output folder after every epoch, every few minutes, and on Ctrl-C: a rerun
   resumes from it, mid-epoch included, with the same batches and augmentations;
4. the best weights saved as ``backbone.safetensors``, whose header names the architecture,
   preprocessing and parent (a backbone the registry loads by path). Its fingerprint differs, so
   its features go to a new store; the parent's store is left as it was (``embedtl cache ls``
   shows it superseded). The folder is extracted again and the head re-fitted on the new
   features with its own config: the **after** accuracies.
"""

from ._config import FineTuneConfig, FineTuneResult, amp_dtype
from ._pipeline import default_out_dir, fine_tune, save_backbone
from ._trainer import CHECKPOINT

__all__ = [
    "CHECKPOINT",
    "FineTuneConfig",
    "FineTuneResult",
    "amp_dtype",
    "default_out_dir",
    "fine_tune",
    "save_backbone",
]
