"""The authors' three U-Nets, counted: params, forward / forward+backward FLOP and the activations
autograd saves, measured on lucidrains' imagen-pytorch with the authors' settings, the same way
tests/bench_flops.py counts ours (torch.utils.flop_counter on the meta device).

Not a test, and imagen-pytorch is not a dependency of this project. To rerun it, put the package
and the two libraries its U-Net module needs somewhere on their own:
    pip install --no-deps --target /tmp/imagen imagen-pytorch==1.26.0 einops beartype
    python tests/bench_authors.py /tmp/imagen
Only `imagen_pytorch/imagen_pytorch.py` is loaded; what it imports for text encoding, video and
data augmentation (transformers, torchvision, kornia, tqdm) is replaced by empty stand-ins, since
the U-Net never calls them. The figures printed are the AUTHORS_MEASURED constants in
bench_flops.py.

Conditioning as ours at stage 3 (what bench_flops.py counts): the base model sees the 3-channel
context image, the super-resolution models the low-resolution image (imagen's `lowres_cond`) and
the 3-channel context.
"""
import importlib.machinery
import importlib.util
import os
import sys
import types

import torch
from torch.utils.flop_counter import FlopCounterMode

# The authors' U-Nets (their training script; docs/design.md, "The paper preset"), with the
# cross-attention layers (to the time tokens, as no text is given) and the init-conv residual
# their script sets: these reproduce issue 29's 412.9 / 300.5 / 690.3 M parameters and 0.259 /
# 0.458 / 12.09 TFLOP exactly (an earlier version left both out and under-counted them).
AUTHORS_UNETS = {
    "paper64": (64, None, dict(dim=256, dim_mults=(1, 2, 3, 4), num_resnet_blocks=3,
                               layer_attns=(False, True, True, True),
                               layer_cross_attns=(False, True, True, True))),
    "paper256": (256, None, dict(dim=128, dim_mults=(1, 2, 4, 8), num_resnet_blocks=2,
                                 layer_attns=(False, False, False, True),
                                 layer_cross_attns=(False, False, True, True),
                                 init_conv_to_final_conv_residual=True,
                                 memory_efficient=True, lowres_cond=True)),
    "paper1024": (1024, 256, dict(dim=128, dim_mults=(1, 2, 4, 8), num_resnet_blocks=(2, 4, 6, 8),
                                  layer_attns=False, layer_cross_attns=(False, False, False, True),
                                  init_conv_to_final_conv_residual=True,
                                  memory_efficient=True, lowres_cond=True)),
}
CONTEXT_CH = 3


def load_imagen_unet(site):
    """imagen_pytorch.imagen_pytorch.Unet from `site`, with stand-ins for what the U-Net never
    uses."""
    sys.path.insert(0, site)

    class Unused:
        def __init__(self, *a, **k):
            pass

    def stub(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = m
        return m
    stub("tqdm")
    stub("tqdm.auto", tqdm=lambda x, **k: x)
    stub("torchvision")
    stub("torchvision.transforms",
         **{k: Unused for k in ("Compose", "Resize", "CenterCrop", "ToTensor", "Lambda")})
    stub("kornia")
    stub("kornia.augmentation", RandomCrop=Unused)
    stub("imagen_pytorch").__path__ = []
    stub("imagen_pytorch.t5", t5_encode_text=None, get_encoded_dim=lambda name: 768,
         DEFAULT_T5_NAME="t5")
    stub("imagen_pytorch.imagen_video", Unet3D=Unused, resize_video_to=None, scale_video_time=None)
    path = os.path.join(site, "imagen_pytorch", "imagen_pytorch.py")
    spec = importlib.util.spec_from_file_location("imagen_pytorch.imagen_pytorch", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Unet


def inputs(kw, size, grad=False):
    x = torch.zeros(1, 3, size, size, requires_grad=grad)
    extra = dict(cond_images=torch.zeros(1, CONTEXT_CH, size, size))
    if kw.get("lowres_cond"):
        extra.update(lowres_cond_img=torch.zeros(1, 3, size, size),
                     lowres_noise_times=torch.zeros(1))
    return x, torch.zeros(1), extra


def measure(Unet, kw, size, train_size):
    """params, forward FLOP at `size`, forward+backward FLOP and saved bytes at `train_size`."""
    with torch.device("meta"):
        net = Unet(**kw, cond_on_text=False, text_embed_dim=768, cond_images_channels=CONTEXT_CH)
        params = sum(p.numel() for p in net.parameters())
        x, t, extra = inputs(kw, size)
        with FlopCounterMode(display=False) as fc:
            net(x, t, **extra)
        forward = fc.get_total_flops()
        x, t, extra = inputs(kw, train_size, grad=True)
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor
        with FlopCounterMode(display=False) as fc:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = net(x, t, **extra)
            out.sum().backward()
    return params, forward, fc.get_total_flops(), saved[0]


def main():
    if len(sys.argv) != 2 or not os.path.isfile(os.path.join(sys.argv[1], "imagen_pytorch",
                                                             "imagen_pytorch.py")):
        sys.exit("usage: python tests/bench_authors.py SITE  (SITE: where imagen-pytorch 1.26.0 "
                 "was installed, see this file's docstring)")
    Unet = load_imagen_unet(sys.argv[1])
    for name, (size, train_size, kw) in AUTHORS_UNETS.items():
        train_size = train_size or size
        params, fwd, fwd_bwd, saved = measure(Unet, kw, size, train_size)
        print(f"{name:10s} {params / 1e6:6.1f} M params; forward at {size} px {fwd / 1e12:.3f} "
              f"TFLOP; at {train_size} px fwd+bwd {fwd_bwd / 1e12:.3f} TFLOP, saved activations "
              f"{saved / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
