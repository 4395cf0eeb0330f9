"""PyTorch reference of `dcl bench train`: images/s of one full SimCLR+DCL training step.

Same model (ResNet BasicBlocks, CIFAR stem, same widths), same two-view batch, same loss (lightly's
DCLLoss; the same formula inline where lightly is not installed, as on an offline GPU machine),
same optimizer (SGD momentum), same thread count, on the CPU or a CUDA card. Prints one JSON
object; `dcl bench train --pytorch` runs it. Not run in CI. Usage:
    pip install torch numpy && pip install --no-deps lightly
    python scripts/pytorch_bench_train.py --model resnet-mini --batch-size 64 --threads 2 [--device cuda]
"""
import argparse
import json
import time

import torch
from torch import nn

ARCH = {"resnet-mini": ([16, 32, 64, 128], [1, 1, 1, 1]), "resnet18": ([64, 128, 256, 512], [2, 2, 2, 2])}


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


def encoder(name):
    widths, blocks = ARCH[name]
    layers, c_in = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()], widths[0]
    for stage, (w, n) in enumerate(zip(widths, blocks)):
        for i in range(n):
            layers.append(Block(c_in, w, 2 if stage > 0 and i == 0 else 1))
            c_in = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    head = nn.Sequential(nn.Linear(c_in, c_in, bias=False), nn.BatchNorm1d(c_in), nn.ReLU(), nn.Linear(c_in, 128))
    return nn.Sequential(*layers, head)


def dcl_loss(temperature):
    """lightly's DCLLoss (weight_fn None, no gathering), or the same formula when lightly is absent."""
    try:
        from lightly.loss import DCLLoss

        return DCLLoss(temperature=temperature), "lightly"
    except ImportError:
        pass

    def loss(z0, z1):
        z0, z1 = nn.functional.normalize(z0, dim=1), nn.functional.normalize(z1, dim=1)

        def one_way(a, b):
            n = a.shape[0]
            positive = (a * b).sum(1) / temperature
            same, cross = a @ a.T / temperature, a @ b.T / temperature
            eye = torch.eye(n, dtype=torch.bool, device=a.device)
            negatives = torch.cat([same.masked_fill(eye, float("-inf")), cross.masked_fill(eye, float("-inf"))], 1)
            return (torch.logsumexp(negatives, 1) - positive).mean()

        return (one_way(z0, z1) + one_way(z1, z0)) / 2

    return loss, "inline"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet-mini", choices=ARCH)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    criterion, loss_from = dcl_loss(0.1)
    model = encoder(args.model).to(device)
    optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x0, x1 = (torch.randn(args.batch_size, 3, 32, 32, device=device) for _ in range(2))

    def step():
        loss = criterion(model(x0), model(x1))
        optim.zero_grad()
        loss.backward()
        optim.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up, as dcl bench does
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    ips = args.steps * args.batch_size / (time.perf_counter() - start)
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "threads": args.threads,
                      "device": args.device, "images_per_sec": ips, "loss": loss_from,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
