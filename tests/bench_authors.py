"""The authors' three U-Nets, counted: params, forward / forward+backward FLOP and the activations
autograd saves, measured on lucidrains' imagen-pytorch with the authors' settings, the same way
tests/bench_flops.py counts ours (torch.utils.flop_counter on the meta device).

Not a test, and imagen-pytorch is not a dependency of this project. To rerun it, put the package
and the two libraries its U-Net module needs somewhere on their own:
    pip install --no-deps --target /tmp/imagen imagen-pytorch==1.26.0 einops beartype
    python tests/bench_authors.py /tmp/imagen [--compare | --fixture tests/data/imagen_unets.pt]
Only `imagen_pytorch/imagen_pytorch.py` is loaded; what it imports for text encoding, video and
data augmentation (transformers, torchvision, kornia, tqdm) is replaced by empty stand-ins, since
the U-Net never calls them. The figures printed are the AUTHORS_MEASURED constants in
bench_flops.py. `--compare` builds each of their U-Nets at width 32 beside our ImagenUNet, copies
their weights into ours (every tensor of ours) and prints how far the outputs differ: float
rounding (< 1e-6) when the two are the same network. `--fixture FILE` saves tiny versions of the
three (their weights under our names, inputs, their outputs) for tests/test_unet.py, which checks
ImagenUNet against them with no imagen-pytorch installed.

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
# their script sets: these reproduce their 412.9 / 300.5 / 690.3 M parameters and 0.259 /
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
    return load_imagen(site).Unet


def load_imagen(site):
    """The module imagen_pytorch.imagen_pytorch from `site` (Unet, Imagen), with stand-ins for
    what neither uses here (text encoding, video, data augmentation)."""
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
    stub("imagen_pytorch.t5", t5_encode_text=lambda *a, **k: None, get_encoded_dim=lambda name: 768,
         DEFAULT_T5_NAME="t5")
    stub("imagen_pytorch.imagen_video", Unet3D=Unused, resize_video_to=None, scale_video_time=None)
    path = os.path.join(site, "imagen_pytorch", "imagen_pytorch.py")
    spec = importlib.util.spec_from_file_location("imagen_pytorch.imagen_pytorch", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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


# ---------------------------------------------------------------- the same weights, the same output

def resblock_names(ours, theirs):
    """(our name, their name) of a ResBlock's parameters."""
    pairs = [("emb", "time_mlp.1"), ("norm1", "block1.groupnorm"), ("conv1", "block1.project"),
             ("norm2", "block2.groupnorm"), ("conv2", "block2.project"), ("skip", "res_conv"),
             ("gca.to_k", "gca.to_k"), ("gca.net.0", "gca.net.0"), ("gca.net.2", "gca.net.2")]
    pairs += [(f"cross.{a}", f"cross_attn.{b}") for a, b in attention_pairs()]
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in pairs]


def attention_pairs():
    return [("norm", "norm"), ("to_q", "to_q"), ("to_kv", "to_kv"), ("null_kv", "null_kv"),
            ("q_scale", "q_scale"), ("k_scale", "k_scale"), ("to_out.0", "to_out.0"),
            ("to_out.1", "to_out.1"), ("to_tokens.0", "to_context.0"),
            ("to_tokens.1", "to_context.1")]


def transformer_names(ours, theirs):
    pairs = [(f"attn.{a}", f"layers.0.0.{b}") for a, b in attention_pairs()]
    pairs += [(f"ff.{k}", f"layers.0.1.{k}") for k in (0, 1, 3, 4)]
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in pairs]


def name_map(net):
    """(our module prefix, theirs) for every piece of an ImagenUNet."""
    pairs = [("emb.freqs", "to_time_hiddens.0.weights"), ("emb.hidden.0", "to_time_hiddens.1"),
             ("aug_emb.freqs", "to_lowres_time_hiddens.0.weights"),
             ("aug_emb.hidden.0", "to_lowres_time_hiddens.1"),
             ("emb.to_emb", "to_time_cond.0"), ("emb.to_tokens", "to_time_tokens.0"),
             ("aug_emb.to_emb", "to_lowres_time_cond.0"),
             ("aug_emb.to_tokens", "to_lowres_time_tokens.0"), ("norm_tokens", "norm_cond"),
             ("out", "final_conv")] + [(f"conv_in.convs.{i}", f"init_conv.convs.{i}")
                                       for i in range(3)]
    pairs += resblock_names("in_block", "init_resnet_block")
    pairs += resblock_names("out_block", "final_res_block")
    pairs += resblock_names("mid.0", "mid_block1") + resblock_names("mid.2", "mid_block2")
    pairs += transformer_names("mid.1", "mid_attn")
    for i, level in enumerate(net.down):
        pairs += [(f"down.{i}.pre.1", f"downs.{i}.0.1"), (f"down.{i}.post.1", f"downs.{i}.4.1"),
                  (f"down.{i}.post.conv3", f"downs.{i}.4.fns.0"),
                  (f"down.{i}.post.conv1", f"downs.{i}.4.fns.1")]
        pairs += resblock_names(f"down.{i}.first", f"downs.{i}.1")
        pairs += sum((resblock_names(f"down.{i}.blocks.{j}", f"downs.{i}.2.{j}")
                      for j in range(len(level["blocks"]))), [])
        pairs += transformer_names(f"down.{i}.attn", f"downs.{i}.3")
    for i, level in enumerate(net.up):
        pairs += [(f"up.{i}.post.0", f"ups.{i}.3.net.0")]
        pairs += resblock_names(f"up.{i}.first", f"ups.{i}.0")
        pairs += sum((resblock_names(f"up.{i}.blocks.{j}", f"ups.{i}.1.{j}")
                      for j in range(len(level["blocks"]))), [])
        pairs += transformer_names(f"up.{i}.attn", f"ups.{i}.2")
    return pairs


def ours_like(kw, context_ch=CONTEXT_CH):
    """Our ImagenUNet configured as imagen-pytorch's Unet(**kw) at stage 3 (context_ch 3; stage 1:
    0, no context)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import unet
    lowres = kw.get("lowres_cond", False)
    levels = lambda v: v if isinstance(v, tuple) else (v,) * len(kw["dim_mults"])
    cfg = unet.UNetConfig(width=kw["dim"], mults=kw["dim_mults"], blocks=kw["num_resnet_blocks"],
                          attn=levels(kw["layer_attns"]),
                          cross_attn=levels(kw["layer_cross_attns"]),
                          heads=kw.get("attn_heads", 8), head_dim=kw.get("attn_dim_head", 64),
                          groups=8,
                          efficient=kw.get("memory_efficient", False), imagen=True,
                          init_residual=kw.get("init_conv_to_final_conv_residual", False),
                          cond_ch=context_ch + 3 * lowres, aug_emb=lowres)
    return unet.build(cfg).eval()


def theirs_weights(theirs, ours):
    """{our parameter name: their tensor} for every parameter of ours that name_map pairs."""
    got, out = dict(theirs.named_parameters()), {}
    for a, b in name_pairs(theirs, ours):
        w = got[b].detach()
        if a.startswith("conv_in.") and a.endswith("weight"):
            # their input channels: context, x, lowres; ours: x, lowres, context
            w = torch.cat([w[:, CONTEXT_CH:], w[:, :CONTEXT_CH]], dim=1)
        out[a] = w
    return out


def formula_weights(net):
    """Weights for every parameter of `net` from its name and shape alone, by arithmetic (no random
    generator: the same on any machine or version): waves in [-1, 1] scaled like an init, norm
    gains and attention scales 1 + 0.1 wave. The fixture's weights, so that it stores no weights."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            k = torch.arange(p.numel(), dtype=torch.float64)
            h = sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 9973
            wave = (torch.sin(k * 0.7531 + h * 1.3183) * torch.cos(k * 0.1127 + h)).view(p.shape)
            gain = name.endswith(("q_scale", "k_scale")) or (p.dim() == 1 and "norm" in name
                                                             and name.endswith("weight"))
            if gain:
                p.copy_(1 + 0.1 * wave)
            elif p.dim() == 1 and not name.endswith("freqs"):  # biases
                p.copy_(0.05 * wave)
            else:  # matrices, kernels, null key / values, learned frequencies
                p.copy_(wave * (3 / max(p[0].numel() if p.dim() > 1 else 1, 1)) ** 0.5)


def formula_inputs(size, lowres):
    """The fixture's inputs, by arithmetic: x, the context, the low-res image (waves), lam."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wave = lambda a, b: torch.stack([torch.sin(a * yy + b * xx + c) for c in range(3)])
    x, ctx, low = (torch.stack([wave(a, b), wave(b, -a)]).float()
                   for a, b in ((0.3, 0.5), (0.2, -0.7), (0.9, 0.1)))
    lam, aug_lam = torch.tensor([-3.0, 4.0]), torch.tensor([1.0, -2.0])
    return dict(x=x, lam=lam, cond=torch.cat([low, ctx], dim=1) if lowres else ctx,
                aug_lam=aug_lam if lowres else None), (x, ctx, low, lam, aug_lam)


def run_both(Unet, kw, size, formula=False):
    """Their Unet and ours with the same weights (theirs from their init, a non-zero output layer
    so that the output depends on everything; or formula_weights), on the same inputs:
    (ours, tensors copied, our inputs, their output)."""
    torch.manual_seed(0)
    theirs = Unet(**kw, cond_on_text=False, text_embed_dim=768, cond_images_channels=CONTEXT_CH)
    with torch.no_grad():
        torch.nn.init.normal_(theirs.final_conv.weight, std=0.05)
    ours, lowres = ours_like(kw), kw.get("lowres_cond", False)
    weights = theirs_weights(theirs, ours)
    mine, got = dict(ours.named_parameters()), dict(theirs.named_parameters())
    with torch.no_grad():
        if formula:  # ours first, then theirs from ours through the same name map
            formula_weights(ours)
            for a, b in ((a, b) for a, b in name_pairs(theirs, ours)):
                w = mine[a]
                if a.startswith("conv_in.") and a.endswith("weight"):  # back to their order
                    w = torch.cat([w[:, -CONTEXT_CH:], w[:, :-CONTEXT_CH]], dim=1)
                got[b].copy_(w)
        else:
            for k, w in weights.items():
                mine[k].copy_(w)
    inputs, (x, ctx, low, lam, aug_lam) = formula_inputs(size, lowres)
    with torch.no_grad():
        extra = dict(lowres_cond_img=low, lowres_noise_times=aug_lam) if lowres else {}
        want = theirs.eval()(x, lam, cond_images=ctx, **extra)
    return ours, weights, inputs, want


def name_pairs(theirs, ours):
    """(our parameter name, theirs) of every parameter theirs_weights copies."""
    got, mine, out = dict(theirs.named_parameters()), dict(ours.named_parameters()), []
    for a, b in name_map(ours):
        for suffix in ("weight", "bias", "weights", ""):
            ka, kb = (f"{a}.{suffix}", f"{b}.{suffix}") if suffix else (a, b)
            kb = kb if kb in got else kb.replace(".weight", ".g")
            if ka in mine and kb in got:
                out.append((ka, kb))
    return out


def compare(Unet, kw, size=32):
    """Our ImagenUNet at a small width given imagen-pytorch's weights: the largest output
    difference, the output's scale, and how many of our parameters were copied from theirs out
    of all."""
    ours, weights, inputs, want = run_both(Unet, kw, size)
    with torch.no_grad():
        out = ours(**inputs)
    return (float((out - want).abs().max()), float(want.abs().max()), len(weights),
            len(dict(ours.named_parameters())))


# The tiny versions in the fixture: the authors' layouts (levels, blocks, attention, cross-
# attention, efficient, init residual) at width 8 and levels of 8, 16, 16, 16 channels, attention
# layers of 2 heads of 8 (the middle ResBlocks' cross-attention keeps 8 of 64 whatever these), on
# 16 px inputs.
FIXTURE = dict(dim=8, dim_mults=(1, 2, 2, 2), attn_heads=2, attn_dim_head=8)
FIXTURE_SIZE = 16


def fixture(Unet, path):
    """tests/data/imagen_unets.pt: per layout our config and imagen-pytorch's output with
    formula_weights on formula_inputs (the test makes both again; nothing else is stored)."""
    out = {}
    for name, (_, _, kw) in AUTHORS_UNETS.items():
        ours, weights, inputs, want = run_both(Unet, dict(kw, **FIXTURE), FIXTURE_SIZE,
                                               formula=True)
        with torch.no_grad():
            diff = float((ours(**inputs) - want).abs().max())
        out[name] = dict(config=ours.cfg.to_dict(), output=want)
        print(f"{name}: {len(weights)} parameter tensors, output scale "
              f"{float(want.abs().max()):.2f}; ours differs by {diff:.2e}")
    torch.save(out, path)
    print(f"wrote {path}: {os.path.getsize(path) / 1e3:.1f} kB")


# ---------------------------------------------------------------- the sampling loop, against theirs

# The sampler fixture: one level of `paper`'s cascade sampled by imagen-pytorch's Imagen.sample
# (p_sample_loop: ancestral steps, dynamic thresholding 0.95, inpainting, the low-res input and its
# noise at 0.2, the context in [0, 1]) with the fixture's tiny U-Nets at levels of 8, 16, 32 px,
# 4 steps, 2 samples: at stage 1 (no context, no known pixels) and at stage 3 (a context and
# known pixels: the top and left quarter, as finished neighbours leave them).
SAMPLER_SIZES, SAMPLER_STEPS, SAMPLER_BATCH = (8, 16, 32), 4, 2


def sampler_inputs(stage, level):
    """The sampler fixture's inputs by arithmetic, in [-1, 1]: the level below's images (None at
    level 0), the context, the known pixels and their mask (None at stage 1)."""
    L, B = SAMPLER_SIZES[level], SAMPLER_BATCH

    def waves(size, a, b):
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        return torch.stack([torch.stack([0.9 * torch.sin(a * (k + 1) * yy + b * xx + c)
                                         for c in range(3)]) for k in range(B)]).float()
    lower = waves(SAMPLER_SIZES[level - 1], 0.7, 0.4) if level else None
    if stage == 1:
        return lower, None, None, None
    mask = torch.zeros(B, 1, L, L, dtype=torch.bool)
    mask[..., :L // 4, :] = mask[..., :, :L // 4] = True
    return lower, waves(L, 0.3, -0.5), waves(L, -0.2, 0.6), mask


def sampler_nets(Unet, stage):
    """The three levels' tiny U-Nets of a stage, ours (formula_weights) and theirs (the same
    weights through the name map), as (ours, their Unet kwargs)."""
    context_ch = CONTEXT_CH if stage > 1 else 0
    ours, kws = [], []
    for name in ("paper64", "paper256", "paper1024"):
        kw = dict(AUTHORS_UNETS[name][2], **FIXTURE)
        net = ours_like(kw, context_ch)
        formula_weights(net)
        ours.append(net)
        kws.append(dict(kw, cond_on_text=False, cond_images_channels=context_ch))
    return ours, kws


def copy_into_theirs(ours, theirs, context_ch):
    """Our weights into their Unet (their input channels: context, x, low-res; ours: x, low-res,
    context)."""
    got, mine = dict(theirs.named_parameters()), dict(ours.named_parameters())
    with torch.no_grad():
        for a, b in name_pairs(theirs, ours):
            w = mine[a]
            if a.startswith("conv_in.") and a.endswith("weight") and context_ch:
                w = torch.cat([w[:, -context_ch:], w[:, :-context_ch]], dim=1)
            got[b].copy_(w)


def imagen_level(module, stage, level, seed):
    """imagen-pytorch's Imagen.sample of one level (start and stop at its U-Net) on
    sampler_inputs, every Gaussian draw taken from one generator seeded `seed`. Returns (their
    output in [-1, 1], the shapes of the draws in the order they were made, our three nets)."""
    ours, kws = sampler_nets(module.Unet, stage)
    imagen = module.Imagen(
        [module.Unet(**kw) for kw in kws], image_sizes=SAMPLER_SIZES, timesteps=SAMPLER_STEPS,
        condition_on_text=False, pred_objectives=("noise", "v", "v"),
        noise_schedules=("cosine", "cosine", "linear"), cond_drop_prob=0.0,
        lowres_sample_noise_level=0.2, dynamic_thresholding=True,
        dynamic_thresholding_percentile=0.95).eval()
    for net, theirs in zip(ours, imagen.unets):
        copy_into_theirs(net, theirs, CONTEXT_CH if stage > 1 else 0)
    lower, context, known, mask = sampler_inputs(stage, level)
    g, shapes, (randn, randn_like) = torch.Generator().manual_seed(seed), [], (torch.randn,
                                                                              torch.randn_like)

    def draw(shape, dtype=None):
        shapes.append(tuple(shape))
        return randn(tuple(shape), generator=g, dtype=dtype or torch.float32)
    to01 = lambda t: None if t is None else (t + 1) / 2  # imagen's images are in [0, 1]
    torch.randn = lambda *shape, **kw: draw(shape[0] if len(shape) == 1 else shape)
    torch.randn_like = lambda x, **kw: draw(x.shape, x.dtype)
    try:
        with torch.no_grad():
            out = imagen.sample(batch_size=SAMPLER_BATCH, cond_images=to01(context),
                                inpaint_images=to01(known),
                                inpaint_masks=None if mask is None else mask[:, 0],
                                inpaint_resample_times=1, start_at_unet_number=level + 1,
                                start_image_or_video=to01(lower), stop_at_unet_number=level + 1,
                                use_tqdm=False)
    finally:
        torch.randn, torch.randn_like = randn, randn_like
    return out * 2 - 1, shapes, ours


def sampler_fixture(module, path):
    """tests/data/imagen_sampler.pt: per (stage, level) the seed, the shapes of imagen's draws,
    its output and our configs (the test makes the inputs and weights again)."""
    out = {}
    for stage in (1, 3):
        for level in range(3):
            seed = 100 * stage + level
            want, shapes, ours = imagen_level(module, stage, level, seed)
            out[f"stage{stage}_level{level}"] = dict(seed=seed, shapes=shapes, output=want,
                                                     configs=[n.cfg.to_dict() for n in ours])
            print(f"stage {stage} level {level}: {len(shapes)} draws, output scale "
                  f"{float(want.abs().max()):.2f}")
    torch.save(out, path)
    print(f"wrote {path}: {os.path.getsize(path) / 1e3:.1f} kB")


def main():
    if len(sys.argv) not in (2, 3, 4) or not os.path.isfile(
            os.path.join(sys.argv[1], "imagen_pytorch", "imagen_pytorch.py")):
        sys.exit("usage: python tests/bench_authors.py SITE [--compare | --fixture FILE | "
                 "--sampler-fixture FILE]  (SITE: where imagen-pytorch 1.26.0 was installed, see "
                 "this file's docstring)")
    module = load_imagen(sys.argv[1])
    Unet = module.Unet
    if sys.argv[2:3] == ["--sampler-fixture"]:
        return sampler_fixture(module, sys.argv[3])
    if sys.argv[2:3] == ["--fixture"]:
        return fixture(Unet, sys.argv[3])
    if sys.argv[2:] == ["--compare"]:
        for name, (_, _, kw) in AUTHORS_UNETS.items():
            small = dict(kw, dim=32)  # 8 heads of 64, as theirs (the middle blocks' fixed)
            diff, scale, n, total = compare(Unet, small)
            print(f"{name:10s} at width 32: {n} of {total} parameter tensors from imagen-pytorch's "
                  f"Unet; outputs differ by at most {diff:.2e} (output scale {scale:.2f})")
        return
    for name, (size, train_size, kw) in AUTHORS_UNETS.items():
        train_size = train_size or size
        params, fwd, fwd_bwd, saved = measure(Unet, kw, size, train_size)
        print(f"{name:10s} {params / 1e6:6.1f} M params; forward at {size} px {fwd / 1e12:.3f} "
              f"TFLOP; at {train_size} px fwd+bwd {fwd_bwd / 1e12:.3f} TFLOP, saved activations "
              f"{saved / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
