"""Errors raised by embedtl.

Every error a user can cause derives from :class:`EmbedTLError`. Messages are written to be
shown as one line and to say what to do next. This module never imports click: only the CLI
turns these into exit codes.
"""

from __future__ import annotations


class EmbedTLError(Exception):
    """Base class of every error embedtl raises on purpose."""


class UsageError(EmbedTLError):
    """Arguments that cannot work together: an output that would overwrite an input or another
    output, an option that does not apply to what it was given (the CLI exits 2)."""


class BackboneError(EmbedTLError):
    """An unknown backbone name, or a spec that cannot be built."""


class DegenerateFeaturesError(BackboneError):
    """A backbone gives the same (or all-zero) features for most images: its weights or the
    image size do not work; nothing of such a run is stored."""


class WeightsNotFoundError(BackboneError):
    """Pretrained weights are not on disk and could not be fetched."""


class DataError(EmbedTLError):
    """The image folder cannot be used as asked (missing, empty, unlabelled where labels are
    needed)."""


class ImageDecodeError(DataError):
    """One image could not be read; the extraction engine records and skips these."""


class StoreError(EmbedTLError):
    """A feature store is missing, unreadable, of an unknown format, or inconsistent.

    ``reason`` is what is wrong; ``advice``, when given, what to do about it (the message is
    both: a caller that already does it, e.g. rebuilds the store, shows the reason alone)."""

    def __init__(self, reason: str, advice: str | None = None) -> None:
        super().__init__(f"{reason}: {advice}" if advice else reason)
        self.reason, self.advice = reason, advice


class StoreLockedError(StoreError):
    """Another process is writing the same feature store."""


class DatasetUnavailableError(EmbedTLError):
    """A packaged dataset's source is not installed on this machine."""


class DeviceError(EmbedTLError):
    """A device was asked for that this machine does not have."""


class HeadError(EmbedTLError):
    """A head artifact is unreadable, of an unknown format, or does not fit the features or
    backbone it is used with."""


class FineTuneError(EmbedTLError):
    """A fine-tune that cannot run as asked (head kind, classes, settings, a foreign checkpoint)."""


class ExportError(EmbedTLError):
    """A model could not be exported, or its export does not match PyTorch."""


class StaleIndexError(EmbedTLError):
    """A saved index does not describe its store any more (and may not be updated)."""


class NotFoundError(EmbedTLError):
    """A store, store row, head or page that a request names is not one of those opened."""


class UploadTooLargeError(DataError):
    """A request's body is over the server's upload cap."""
