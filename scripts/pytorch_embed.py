#!/usr/bin/env python3
"""PyTorch loads a `model.safetensors` written by `dcl pretrain` into a torchvision-style ResNet
(torchvision's BasicBlock, CIFAR stem, no max-pool, no fc, plus the SimCLR head) with
`load_state_dict(strict=True)`, runs it in eval mode, and compares with `dcl embed` (the WGSL
inference engine) on the same images. Not run in CI (needs torch and torchvision).

    python3 scripts/pytorch_embed.py --model runs/x/model.safetensors [--dcl target/release/dcl]
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = np.frombuffer(body[start:end], dtype="<f4").reshape(info["shape"])
        tensors[name] = torch.from_numpy(data.copy())
    return tensors


class Encoder(nn.Module):
    """torchvision's ResNet layout with the CIFAR stem; widths and blocks read off the weights."""

    def __init__(self, widths, blocks):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = widths[0]
        for s, (width, count) in enumerate(zip(widths, blocks)):
            layers = []
            for i in range(count):
                stride = 2 if s > 0 and i == 0 else 1
                down = None
                if stride != 1 or c_in != width:
                    down = nn.Sequential(nn.Conv2d(c_in, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                layers.append(BasicBlock(c_in, width, stride, down))
                c_in = width
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        d = widths[3]
        self.head = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, 128))

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        features = x.mean(dim=(2, 3))
        return features, self.head(features)


def architecture(tensors):
    widths = [tensors[f"layer{s}.0.conv1.weight"].shape[0] for s in range(1, 5)]
    blocks = [1 + max(int(k.split(".")[1]) for k in tensors if k.startswith(f"layer{s}.")) for s in range(1, 5)]
    return widths, blocks


def write_npy(path, array):
    np.save(path, array.astype("<f4"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dcl", default=os.path.expanduser("~/.cache/dcl-target/release/dcl"))
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()

    tensors = read_safetensors(args.model)
    widths, blocks = architecture(tensors)
    model = Encoder(widths, blocks)
    # BatchNorm's num_batches_tracked is a PyTorch-only counter; everything else must match.
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.eval()

    images = np.random.default_rng(0).standard_normal((args.images, 3, 32, 32)).astype("<f4")
    with torch.no_grad():
        features, projections = (t.numpy() for t in model(torch.from_numpy(images)))
    with tempfile.TemporaryDirectory() as tmp:
        npy = os.path.join(tmp, "images.npy")
        write_npy(npy, images)
        ours = {}
        for key, flags in [("features", []), ("projections", ["--projected"])]:
            out = os.path.join(tmp, f"{key}.npy")
            subprocess.run([args.dcl, "embed", "--model", args.model, "--data", npy, *flags, "--out", out],
                           check=True, stderr=subprocess.DEVNULL)
            ours[key] = np.load(out)
    worst = 0.0
    for key, torch_out in [("features", features), ("projections", projections)]:
        error = np.abs(ours[key] - torch_out).max() / np.abs(torch_out).max()
        worst = max(worst, error)
        print(f"{key}: {list(torch_out.shape)}, max relative difference PyTorch vs dcl embed {error:.2e}")
    print(f"widths {widths}, blocks {blocks}: {'match' if worst < 1e-4 else 'MISMATCH'} (bar 1e-4)")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
