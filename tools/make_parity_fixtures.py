"""Generate timm reference fixtures for the effnet parity tests.

Run with the peers venv (made by /work/shared/bench/setup-peers.sh):

    ~/.cache/effnet-peers/bin/python tools/make_parity_fixtures.py
        Small configuration that uses every block kind, written to
        crates/model/tests/fixtures/parity/ (committed).

    ~/.cache/effnet-peers/bin/python tools/make_parity_fixtures.py \\
            --arch tf_efficientnet_b0 --out DIR [--img-size 224] [--batch 2]
        A full-size timm model (1000 classes), written to DIR.

The model is built the way timm builds its `tf_` variants (BN eps 1e-3, BN momentum 0.1,
TF "SAME" padding, channels rounded by `round_channels`), then every weight is replaced with
seeded random values: conv/linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.2), BN weight
~ U(0.5, 1.5), bias ~ N(0, 0.2), running_mean ~ N(0, 0.2), running_var ~ U(0.5, 1.5); the
main-path convs are then rescaled on the fixture input so that eval-mode activations stay
O(1) (see rescale_convs_). The reference runs in float64 on those float32 weights; every
output is stored as float32.

Files written:
    weights.safetensors  state dict before the train step, float32 (num_batches_tracked
                         int64), timm key names; metadata "keys" is a JSON list of the keys
                         in timm's state-dict order.
    io.safetensors       input (NCHW), labels (int64), logits_eval, logits_train,
                         loss ([1], cross entropy with label smoothing, batch mean),
                         grad.<param> for every parameter (from the train-mode step) and
                         after.<buffer> for every BN buffer after that one train forward.
                         The gradient of a BN bias whose output reaches a train-mode BN
                         through only a 1x1 conv is analytically zero (stored as ~1e-17).
    config.json          the configuration needed to rebuild the model.
"""
import argparse
import json
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers.padding import get_same_padding
from timm.models._efficientnet_blocks import (
    ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual, SqueezeExcite)
from timm.models._efficientnet_builder import BN_EPS_TF_DEFAULT, decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet

SEED = 0
LABEL_SMOOTHING = 0.1
PARITY_DIR = Path(__file__).resolve().parent.parent / 'crates/model/tests/fixtures/parity'

SMALL = dict(
    arch_def=[
        ['cn_r2_k3_s1_e1_c8_skip'],     # ConvBnAct (Fused-MBConv, expansion 1), skip on both
        ['er_r1_k3_s2_e4_c16'],         # EdgeResidual (Fused-MBConv), stride 2 on an odd size
        ['ds_r1_k3_s1_e1_c16_se0.25'],  # DepthwiseSeparable with SE and skip
        ['ir_r2_k5_s2_e4_c24_se0.25'],  # MBConv + SE, 5x5 stride 2 on an even size, then skip
        ['ir_r2_k3_s1_e3_c32_nr6'],     # Lite-style MBConv: ReLU6 block act, no SE, skip on repeat
    ],
    stem_size=8,
    num_features=32,
    num_classes=10,
    channel_multiplier=1.0,
    depth_multiplier=1.0,
    img_size=30,
)

# (kind, stride, kernel, in_chs, out_chs, mid_chs, se_chs, has_skip, act) of every block of
# SMALL, in order; checked so that an edit to SMALL cannot silently drop a case.
SMALL_EXPECTED_BLOCKS = [
    ('cn', 1, 3, 8, 8, None, None, True, 'SiLU'),
    ('cn', 1, 3, 8, 8, None, None, True, 'SiLU'),
    ('er', 2, 3, 8, 16, 32, None, False, 'SiLU'),
    ('ds', 1, 3, 16, 16, None, 4, True, 'SiLU'),
    ('ir', 2, 5, 16, 24, 64, 4, False, 'SiLU'),
    ('ir', 1, 5, 24, 24, 96, 6, True, 'SiLU'),
    ('ir', 1, 3, 24, 32, 72, None, False, 'ReLU6'),
    ('ir', 1, 3, 32, 32, 96, None, True, 'ReLU6'),
]


def build_small():
    """The SMALL configuration, built as timm's `tf_efficientnet_*` entrypoints build theirs."""
    round_chs_fn = partial(round_channels, multiplier=SMALL['channel_multiplier'])
    model = EfficientNet(
        block_args=decode_arch_def(SMALL['arch_def'], SMALL['depth_multiplier']),
        num_classes=SMALL['num_classes'],
        num_features=round_chs_fn(SMALL['num_features']),
        stem_size=SMALL['stem_size'],
        round_chs_fn=round_chs_fn,
        act_layer=nn.SiLU,
        norm_layer=partial(nn.BatchNorm2d, eps=BN_EPS_TF_DEFAULT),
        pad_type='same',
    )
    config = dict(
        arch_def=SMALL['arch_def'],
        stem_size=SMALL['stem_size'],
        num_features=SMALL['num_features'],
        num_classes=SMALL['num_classes'],
        channel_multiplier=SMALL['channel_multiplier'],
        depth_multiplier=SMALL['depth_multiplier'],
        fix_stem_head=False,
        act='silu',
    )
    return model, config


def build_timm(name):
    model = timm.create_model(name, pretrained=False, drop_rate=0.0, drop_path_rate=0.0)
    config = dict(
        timm_name=name,
        stem_size=model.conv_stem.out_channels,
        num_features=model.num_features,
        num_classes=model.num_classes,
        act=type(model.bn1.act).__name__.lower(),
    )
    return model, config


def describe_block(block):
    """(kind, stride, kernel, in_chs, out_chs, mid_chs, se_chs, has_skip, act) of one block."""
    se = getattr(block, 'se', None)
    se_chs = se.conv_reduce.out_channels if isinstance(se, SqueezeExcite) else None
    act = type(block.bn1.act).__name__
    if isinstance(block, ConvBnAct):
        conv = block.conv
        return ('cn', conv.stride[0], conv.kernel_size[0], conv.in_channels, conv.out_channels,
                None, None, block.has_skip, act)
    if isinstance(block, DepthwiseSeparableConv):
        conv = block.conv_dw
        return ('ds', conv.stride[0], conv.kernel_size[0], conv.in_channels,
                block.conv_pw.out_channels, None, se_chs, block.has_skip, act)
    if isinstance(block, EdgeResidual):
        conv = block.conv_exp
        return ('er', conv.stride[0], conv.kernel_size[0], conv.in_channels,
                block.conv_pwl.out_channels, conv.out_channels, se_chs, block.has_skip, act)
    if isinstance(block, InvertedResidual):
        conv = block.conv_dw
        return ('ir', conv.stride[0], conv.kernel_size[0], block.conv_pw.in_channels,
                block.conv_pwl.out_channels, conv.out_channels, se_chs, block.has_skip, act)
    raise TypeError(f'unexpected block type {type(block).__name__}')


def print_blocks(model):
    print('blocks (kind, stride, kernel, in, out, mid, se, skip, act):')
    for stage_idx, stage in enumerate(model.blocks):
        for block_idx, block in enumerate(stage):
            print(f'  blocks.{stage_idx}.{block_idx}: {describe_block(block)}')


@torch.no_grad()
def randomize_(model, gen):
    """Seeded random weights, with BN affine parameters and running stats far from identity."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, fan_in ** -0.5, generator=gen)
            if module.bias is not None:
                module.bias.normal_(0.0, 0.2, generator=gen)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.uniform_(0.5, 1.5, generator=gen)
            module.bias.normal_(0.0, 0.2, generator=gen)
            module.running_mean.normal_(0.0, 0.2, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)


# The conv whose (normalized) output a residual block adds to its shortcut.
BRANCH_OUT_CONV = {ConvBnAct: 'conv', DepthwiseSeparableConv: 'conv_pw',
                   EdgeResidual: 'conv_pwl', InvertedResidual: 'conv_pwl'}


@torch.no_grad()
def rescale_convs_(model, x):
    """Keep eval-mode activations O(1) although the BN running stats are random.

    In one eval forward over x, every bias-free conv (the main path; SE convs keep their
    init) is rescaled so that its output has unit std, and the last conv of every residual
    branch so that its output has std 1/sqrt(blocks in the stage): residual sums then do not
    grow along the long stages of the large models.
    """
    target_std = {}
    for stage in model.blocks:
        for block in stage:
            if block.has_skip:
                target_std[getattr(block, BRANCH_OUT_CONV[type(block)])] = len(stage) ** -0.5

    def rescale(conv, _inputs, output):
        scale = target_std.get(conv, 1.0) / output.std().item()
        conv.weight.mul_(scale)
        return output * scale

    hooks = [module.register_forward_hook(rescale)
             for module in model.modules() if isinstance(module, nn.Conv2d) and module.bias is None]
    model.eval()
    model(x)
    for hook in hooks:
        hook.remove()


def eval_forward(model, x):
    """Eval-mode logits for x, printing the size and TF SAME padding at every stride-2 conv and
    the std / max |x| of each stage output (to check that activations stay O(1))."""
    def conv_report(name, conv, inputs, output):
        h, k = inputs[0].shape[-1], conv.kernel_size[0]
        pad = get_same_padding(h, k, conv.stride[0], conv.dilation[0])
        print(f'  stride-2 conv {name}: k{k} {h}x{h} -> {output.shape[-1]}x{output.shape[-1]}, '
              f'pad before {pad // 2} after {pad - pad // 2}')

    def stage_report(idx, _stage, _inputs, out):
        print(f'  stage {idx} out {tuple(out.shape)}: std {out.std():.3f} max|x| {out.abs().max():.3f}')

    hooks = [module.register_forward_hook(partial(conv_report, name))
             for name, module in model.named_modules()
             if isinstance(module, nn.Conv2d) and module.stride[0] == 2]
    hooks += [stage.register_forward_hook(partial(stage_report, idx))
              for idx, stage in enumerate(model.blocks)]
    model.eval()
    print('eval forward:')
    with torch.no_grad():
        logits = model(x)
    print(f'  logits: std {logits.std():.3f} max|x| {logits.abs().max():.3f}')
    for hook in hooks:
        hook.remove()
    return logits


def watch_relu6_kinks(model):
    """Hooks recording, over the following forwards, each ReLU6 input's distance to a kink
    (0 or 6): float32 rounding across a kink flips that element's gradient, which a test's
    gradient tolerance must allow for. Returns (min distance list, count-within-1e-5 list, hooks)."""
    closest, near = [], []

    def record(_module, inputs):
        dist = torch.minimum(inputs[0].abs(), (inputs[0] - 6).abs())
        closest.append(dist.min().item())
        near.append(int((dist < 1e-5).sum()))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.ReLU6)]
    return closest, near, hooks


def f32(tensor):
    return tensor.detach().to(torch.float32).contiguous()


def generate(model, config, batch, img_size, out_dir):
    gen = torch.Generator().manual_seed(SEED)
    randomize_(model, gen)
    # A per-image, per-channel offset keeps the images distinguishable after global pooling.
    x = torch.randn(batch, 3, img_size, img_size, generator=gen) + torch.randn(batch, 3, 1, 1, generator=gen)
    labels = torch.randint(0, config['num_classes'], (batch,), generator=gen)
    rescale_convs_(model, x)

    state = model.state_dict()
    weights = {k: v.clone().contiguous() if v.dtype == torch.int64 else f32(v) for k, v in state.items()}

    model.double()
    x64 = x.double()
    closest, near, hooks = watch_relu6_kinks(model)
    logits_eval = eval_forward(model, x64)

    model.train()
    logits_train = model(x64)
    loss = F.cross_entropy(logits_train, labels, label_smoothing=LABEL_SMOOTHING)
    loss.backward()
    print(f'loss {loss.item():.6f}')
    for hook in hooks:
        hook.remove()
    if closest:
        print(f'ReLU6 inputs: closest to a kink {min(closest):.2e}, {sum(near)} within 1e-5')

    bn_buffers = {f'{mod_name}.{buf_name}': buf
                  for mod_name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)
                  for buf_name, buf in module.named_buffers(recurse=False)}
    assert len(bn_buffers) == len(list(model.buffers())), 'model has non-BN buffers'

    io = dict(input=x.contiguous(), labels=labels, logits_eval=f32(logits_eval),
              logits_train=f32(logits_train), loss=f32(loss.reshape(1)))
    io.update({f'grad.{name}': f32(p.grad) for name, p in model.named_parameters()})
    io.update({f'after.{name}': buf.clone() if buf.dtype == torch.int64 else f32(buf)
               for name, buf in bn_buffers.items()})

    bn = model.bn1
    config = dict(
        config,
        bn_eps=bn.eps,
        bn_momentum=bn.momentum,
        label_smoothing=LABEL_SMOOTHING,
        batch=batch,
        img_size=img_size,
        timm_version=timm.__version__,
        torch_version=torch.__version__,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, out_dir / 'weights.safetensors', metadata={'keys': json.dumps(list(weights))})
    save_file(io, out_dir / 'io.safetensors')
    (out_dir / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    for path in sorted(out_dir.iterdir()):
        print(f'wrote {path} ({path.stat().st_size} bytes)')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', help='timm model name; default: the small parity configuration')
    parser.add_argument('--out', type=Path, help=f'output directory (default for the small config: {PARITY_DIR})')
    parser.add_argument('--img-size', type=int, help='input height and width (default: 30 small, 224 --arch)')
    parser.add_argument('--batch', type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    if args.arch:
        if args.out is None:
            parser.error('--arch needs --out')
        model, config = build_timm(args.arch)
        img_size = args.img_size or 224
    else:
        model, config = build_small()
        img_size = args.img_size or SMALL['img_size']
    print_blocks(model)
    if not args.arch:
        blocks = [describe_block(b) for stage in model.blocks for b in stage]
        assert blocks == SMALL_EXPECTED_BLOCKS, 'SMALL no longer builds the intended blocks'
    print(f'trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad)}')
    generate(model, config, args.batch, img_size, args.out or PARITY_DIR)


if __name__ == '__main__':
    main()
