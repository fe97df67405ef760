"""Building a backbone: the spec's architecture with its weights (a package's ``.pth``, a
torchvision enum, timm's hub weights, a local checkpoint or an embedtl backbone file), cut at
its classifier into a :class:`~embedtl._model.FeatureModel`. Checkpoints are read with
``weights_only=True`` or as safetensors: nothing is unpickled. torch is imported on use."""

from __future__ import annotations

import os
import pickle
import warnings
from typing import TYPE_CHECKING, Any

from .backbones import (
    BackboneSpec,
    classifier_name,
    create_arch,
    downloads_allowed,
    split_classifier,
)
from .errors import BackboneError, WeightsNotFoundError

if TYPE_CHECKING:
    from ._model import FeatureModel

__all__ = ["build_feature_model", "torch_load_error"]


def build_feature_model(spec: BackboneSpec, *, allow_download: bool | None = None) -> FeatureModel:
    """Build the network for ``spec`` with its weights. Never falls back to random weights."""
    import torch

    if allow_download is None:
        allow_download = downloads_allowed()
    pretrained_timm = spec.weights.startswith("timm:")
    if pretrained_timm and not spec.weights_available():
        if not allow_download:
            raise WeightsNotFoundError(spec.missing_weights_message())
        _reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co", spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # "random" weights are explicit and reproducible
            net = create_arch(spec.source, spec.arch, pretrained_timm=pretrained_timm)
    except WeightsNotFoundError:
        raise
    except Exception as e:
        if pretrained_timm:
            raise WeightsNotFoundError(spec.missing_weights_message() + f" ({e})") from e
        raise BackboneError(f"cannot build {spec.arch}: {e}") from e
    if not (spec.weights == "random" or pretrained_timm):
        _load_weights(net, spec, allow_download)
    name = classifier_name(net, spec.source)
    body, classifier = split_classifier(net, spec.source)
    body.requires_grad_(False)
    from ._model import FeatureModel

    return FeatureModel(spec, body, classifier, name)


def _reachable(url: str, spec: BackboneSpec, timeout: float = 3.0) -> None:
    """Fail at once, in one line, when the host of a download is unreachable (offline, or a
    firewall), instead of the hub clients' minute of retries."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    proxies = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")
    if not u.hostname or any(os.environ.get(k) for k in proxies):
        return  # behind a proxy a direct connection proves nothing: the download will tell
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise WeightsNotFoundError(
            f"{spec.missing_weights_message()} (offline? {u.hostname}:{port} is unreachable: "
            f"{e.strerror or e})"
        ) from None


def _load_weights(net, spec: BackboneSpec, allow_download: bool) -> None:
    """``spec``'s weights file into ``net`` (a torchvision enum's file downloaded first when
    it is not in the hub cache and downloads are allowed)."""
    import torch

    if spec.weights.startswith("torchvision:"):
        if not spec.weights_available():
            if not allow_download:
                raise WeightsNotFoundError(spec.missing_weights_message())
            _reachable(spec.weights_url or "", spec)
            try:
                torch.hub.load_state_dict_from_url(spec.weights_url, progress=False)
            except Exception as e:
                raise WeightsNotFoundError(spec.missing_weights_message() + f" ({e})") from e
        sd = torch.load(spec.weights_path, map_location="cpu", weights_only=True)
        _load_state_dict_lenient_head(net, sd, str(spec.weights_path), set())
        return
    if spec.weights_path is None or not os.path.isfile(spec.weights_path):
        raise WeightsNotFoundError(spec.missing_weights_message())
    sd = _read_checkpoint(spec.weights_path)
    if spec.weights_format == "lukemelas" and next(iter(sd), "").startswith("_"):
        _load_lukemelas(net, sd, spec.weights_path)
    else:
        head = classifier_name(net, spec.source) + "."
        head_keys = {k for k in net.state_dict() if k.startswith(head)}
        _load_state_dict_lenient_head(net, sd, spec.weights_path, head_keys)


def _load_lukemelas(net, state_dict: dict[str, Any], where: str) -> None:
    """Map lukemelas ``efficientnet_pytorch`` keys onto timm's, one to one, in order."""
    target = net.state_dict()
    if len(state_dict) != len(target):
        raise BackboneError(
            f"{where}: {len(state_dict)} tensors, but {len(target)} expected for this architecture"
        )
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(state_dict.items(), target.items(), strict=True):
        if tuple(value.shape) != tuple(ref.shape):
            raise BackboneError(
                f"{where}: tensor {src_key} has shape {tuple(value.shape)}, "
                f"but {dst_key} needs {tuple(ref.shape)}"
            )
        mapped[dst_key] = value
    net.load_state_dict(mapped, strict=True)


def torch_load_error(e: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line: torch's own
    reason ("Trying to load unsupported GLOBAL posix.system ..."), never its advice to load with
    ``weights_only=False`` (that runs whatever code the file holds)."""
    if isinstance(e, pickle.UnpicklingError):
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = [ln for ln in lines if "GLOBAL" in ln or "WeightsUnpickler" in ln]
        return why[0][:200] if why else "it holds objects that are not tensors"
    sentences = " ".join(str(e).split()).split(". ")
    kept = ". ".join(x for x in sentences if "weights_only" not in x) or type(e).__name__
    return kept[:200]


def _read_checkpoint(path: str) -> dict[str, Any]:
    import torch

    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise BackboneError(
                f"cannot read checkpoint {path}: not a valid safetensors file ({e})"
            ) from None
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes: the outcome is what counts
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BackboneError(
            f"cannot read checkpoint {path}: it holds more than tensors and plain containers, "
            f"and embedtl never unpickles code ({torch_load_error(e)}); save it with "
            "torch.save(model.state_dict(), PATH) or as .safetensors"
        ) from None
    except Exception as e:
        raise BackboneError(f"cannot read checkpoint {path}: {torch_load_error(e)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return obj


def _load_state_dict_lenient_head(net, sd: dict[str, Any], where: str, classifier_keys: set[str]):
    """Load a state dict; the classifier may differ (fine-tuned heads), nothing else may."""
    own = net.state_dict()
    sd = {
        k: v
        for k, v in sd.items()
        if not (k in classifier_keys and (k not in own or own[k].shape != v.shape))
    }
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in classifier_keys]
    unexpected = [k for k in unexpected if k not in classifier_keys]
    if missing or unexpected:
        raise BackboneError(
            f"{where} does not match {type(net).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
