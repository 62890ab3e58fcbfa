"""Generate the small tensor-file fixtures for the `effnet_model::io` unit tests.

Run with the peers venv (made by /work/shared/bench/setup-peers.sh):

    ~/.cache/effnet-peers/bin/python tools/make_io_fixtures.py

Files written to crates/model/tests/fixtures/io/ (committed, a few KB in all):
    small.pth          torch.save zip format: an OrderedDict with a float32 Parameter (2x3),
                       a transposed (non-contiguous) float32 tensor, a view with a storage
                       offset into another tensor's storage, float16, bfloat16, an int64
                       scalar `bn.num_batches_tracked`, float64 and int32 tensors.
    small_legacy.pth   the same dict, `_use_new_zipfile_serialization=False` (legacy format).
    nested.pth         {"state_dict": {"backbone": {...}, "head.bias": ...}, "epoch": 3}.
    small.safetensors  written by the `safetensors` package, one tensor per supported dtype,
                       metadata {"format": "pt", "note": ...}.
    expected.json      for each file: tensors in file order with name, shape, kind ("f32" or
                       "i64") and values as the reader must return them (float types as the
                       float32 values they convert to), and the metadata.
"""
import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / 'crates/model/tests/fixtures/io'


def small_dict():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 1.25
    d = OrderedDict()
    # A Parameter pickles through torch._utils._rebuild_parameter.
    d['conv.weight'] = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.25], [3.0, -0.125, 1e-3]]),
                                          requires_grad=False)
    d['fc.weight'] = base.t()  # 4x3 view, strides (1, 4)
    d['fc.bias'] = base[1, 1:4]  # storage offset 5 into the same storage as fc.weight
    d['half.weight'] = torch.tensor([0.5, -1.25, 3.140625, 65504.0, 2.0 ** -24, -0.0],
                                    dtype=torch.float16).reshape(2, 3)
    d['bf16.weight'] = torch.tensor([1.0, -0.5, 3.0e38, 2.0 ** -126], dtype=torch.bfloat16)
    d['bn.num_batches_tracked'] = torch.tensor(7, dtype=torch.int64)
    d['double.weight'] = torch.tensor([1.0 / 3.0, -2.5, 1e-3], dtype=torch.float64)
    d['int.index'] = torch.tensor([[-3, 0], [2147483647, -2147483648]], dtype=torch.int32)
    return d


def nested_dict():
    return {
        'state_dict': OrderedDict([
            ('backbone', OrderedDict([
                ('stem.weight', torch.tensor([[1.0, 2.0], [3.0, 4.0]])),
                ('stem.num_batches_tracked', torch.tensor(0)),
            ])),
            ('head.bias', torch.tensor([-1.5, 0.25, 8.0])),
        ]),
        'epoch': 3,
    }


def safetensors_dict():
    d = OrderedDict()
    d['a.f32'] = torch.tensor([[1.5, -2.0], [0.1, 7.0]], dtype=torch.float32)
    d['b.f16'] = torch.tensor([0.5, -65504.0, 2.0 ** -24], dtype=torch.float16)
    d['c.bf16'] = torch.tensor([1.0, -3.0e38], dtype=torch.bfloat16)
    d['d.f64'] = torch.tensor([1.0 / 3.0], dtype=torch.float64)
    d['e.i64'] = torch.tensor([-(2 ** 62), 5], dtype=torch.int64)
    d['f.i32'] = torch.tensor([[-7], [9]], dtype=torch.int32)
    d['g.i16'] = torch.tensor([-32768, 32767], dtype=torch.int16)
    d['h.i8'] = torch.tensor([-128, 127], dtype=torch.int8)
    d['i.u8'] = torch.tensor([0, 255], dtype=torch.uint8)
    d['j.bool'] = torch.tensor([True, False, True])
    d['k.scalar'] = torch.tensor(2.5)
    d['l.empty'] = torch.zeros(0, 3)
    return d


def flatten(d, prefix=''):
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flatten(v, f'{prefix}{k}.')
        elif isinstance(v, torch.Tensor):
            out.append((prefix + k, v))
    return out


def describe(items):
    out = []
    for name, t in items:
        t = t.detach()
        if t.dtype.is_floating_point:
            kind, values = 'f32', t.to(torch.float32).reshape(-1).tolist()
        else:
            kind, values = 'i64', t.to(torch.int64).reshape(-1).tolist()
        out.append({'name': name, 'shape': list(t.shape), 'kind': kind, 'values': values})
    return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    small = small_dict()
    torch.save(small, OUT / 'small.pth')
    torch.save(small, OUT / 'small_legacy.pth', _use_new_zipfile_serialization=False)
    nested = nested_dict()
    torch.save(nested, OUT / 'nested.pth')
    st = safetensors_dict()
    st_meta = {'format': 'pt', 'note': 'io fixture "quoted" \u00e9'}
    save_file(st, OUT / 'small.safetensors', metadata=st_meta)
    (OUT / 'small.safetensors').chmod(0o644)  # save_file leaves it private

    # safetensors orders tensors by data offset: by dtype alignment, then by name.
    header_len = int.from_bytes((OUT / 'small.safetensors').read_bytes()[:8], 'little')
    header = json.loads((OUT / 'small.safetensors').read_bytes()[8:8 + header_len])
    st_order = sorted((k for k in header if k != '__metadata__'),
                      key=lambda k: (header[k]['data_offsets'], k))

    expected = {
        'small.pth': {'tensors': describe(small.items()), 'metadata': {}},
        'small_legacy.pth': {'tensors': describe(small.items()), 'metadata': {}},
        'nested.pth': {'tensors': describe(flatten(nested['state_dict'])), 'metadata': {}},
        'small.safetensors': {'tensors': describe((k, st[k]) for k in st_order),
                              'metadata': st_meta},
    }
    (OUT / 'expected.json').write_text(json.dumps(expected, indent=1) + '\n')
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f'wrote {OUT} ({total} bytes)')


if __name__ == '__main__':
    main()
