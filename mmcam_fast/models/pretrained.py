"""Loading local torchvision-format ImageNet weights into a CAM model's backbone, strictly."""

from __future__ import annotations

from pathlib import Path

import torch

from mmcam_fast.errors import ConfigError
from mmcam_fast.models.backbones import BackboneSpec
from mmcam_fast.models.cam_model import CAMModel

_MAX_LISTED = 8


def _load_failure(exc: Exception) -> str:
    """The cause of a failed ``torch.load(weights_only=True)`` in one line, without torch's advice to
    load the file with ``weights_only=False`` (a state dict never needs it)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        cause = text.split(marker, 1)[1].strip().split("\n", 1)[0].strip()
        return (f"{cause}; expected a file of tensors only, as torch.save(model.state_dict(), path) "
                "writes")
    return text.splitlines()[0] if text else type(exc).__name__


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_pretrained(model: CAMModel, path: str | Path, spec: BackboneSpec) -> None:
    """Copy a torchvision state dict (e.g. resnet50-0676ba61.pth) into ``model.backbone``.

    Only the new layers (``spec.new_layers``: VGG16-CAM's conv6; and the CAM head ``fc``) may be absent,
    and only the torchvision head (``spec.head_prefixes``) may be left over. A missing backbone
    key, a shape mismatch, or a key that is neither a backbone key nor the torchvision head is an error
    naming the file and the first keys concerned; nothing is loaded in that case.

    Raises:
        ConfigError: the file is missing, unreadable or does not match the backbone (names --pretrained).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--pretrained {path}: file not found (weights are never downloaded at run time)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        cause = _load_failure(exc)
        raise ConfigError(f"--pretrained {path}: not a readable torch state dict ({cause})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {_strip(k): v for k, v in state.items()}

    target = model.backbone.state_dict()
    missing = [k for k in target if k not in state and not k.startswith(spec.new_layers)
               and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in target.items() if k in state and state[k].shape != v.shape]
    unexpected = [k for k in state if k not in target and not k.startswith(spec.head_prefixes)]
    problems = []
    for what, keys in (("missing", missing), ("shape mismatch", mismatched), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
            problems.append(f"{what}: {', '.join(keys[:_MAX_LISTED])}{more}")
    if problems:
        raise ConfigError(f"--pretrained {path}: does not match the backbone ({'; '.join(problems)}); "
                          "expected a torchvision state dict of the same architecture")
    model.backbone.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
