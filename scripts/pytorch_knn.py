"""PyTorch CPU reference of the short Fashion-MNIST run that `tests/training.rs` asserts on.

Same data (the first --limit training images, padded 28 -> 32 and replicated to 3 channels, CIFAR
mean/std), same encoder (see pytorch_bench_train.py), same SimCLR views, lightly's loss, Adam, cosine
schedule, and the same kNN monitor (k 200, cosine, temperature 0.1; bank: the training subset without
augmentation; queries: the 10,000 test images), before training and after each epoch. It answers
"what kNN gain does this budget give in PyTorch?", so dcl's figure has an outside reference; it
also prints the same kNN on raw pixels, the floor a useful encoder should clear. `--init pytorch`
swaps torchvision's ResNet init (dcl's) for PyTorch's default conv init; `--bank full` uses all
60,000 training images as the kNN bank. Not run in CI. Usage:
    python scripts/pytorch_knn.py --limit 5000 --epochs 3 --batch-size 32 --lr 1e-3 --temperature 0.1
"""
import argparse
import gzip
import math
import time

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch import nn

from pytorch_bench_train import encoder

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def idx(path):
    with gzip.open(path) as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def split(root, prefix, limit=None):
    images = idx(f"{root}/{prefix}-images-idx3-ubyte.gz")[:limit]
    labels = idx(f"{root}/{prefix}-labels-idx1-ubyte.gz")[:limit]
    x = torch.from_numpy(images.copy()).float().div(255)[:, None]
    x = nn.functional.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))


def normalize(x):
    return T.functional.normalize(x, MEAN, STD)


@torch.no_grad()
def knn_top1(features, train, test, k=200, temperature=0.1, classes=10):
    feats = lambda x: nn.functional.normalize(torch.cat([features(b) for b in x.split(500)]), dim=1)
    bank, queries = feats(train[0]), feats(test[0])
    sims, nearest = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), classes).scatter_add_(1, train[1][nearest], (sims / temperature).exp())
    return (votes.argmax(1) == test[1]).float().mean().item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--model", default="resnet-mini")
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--loss", default="dcl", choices=["dcl", "dclw", "infonce"])
    p.add_argument("--crop-min-scale", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bank", default="subset", choices=["subset", "full"], help="kNN bank: the training subset or all 60,000")
    p.add_argument("--init", default="torchvision", choices=["torchvision", "pytorch"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from lightly.loss import DCLLoss, DCLWLoss, NTXentLoss

    loss_fn = {"dcl": DCLLoss, "dclw": DCLWLoss, "infonce": NTXentLoss}[args.loss](temperature=args.temperature)
    train, test = split(args.data, "train", args.limit), split(args.data, "t10k")
    bank = split(args.data, "train", None if args.bank == "full" else args.limit)
    view = T.Compose([
        T.RandomResizedCrop(32, scale=(args.crop_min_scale, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(0.2),
    ])
    model = encoder(args.model)
    if args.init == "torchvision":  # what dcl does (model.rs): kaiming normal, fan_out, for ReLU
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    backbone = model[:-1]
    optim = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train[0]) // args.batch_size
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    def encoder_knn():
        backbone.eval()
        top1 = knn_top1(lambda x: backbone(normalize(x)), bank, test)
        backbone.train()
        return top1

    print(f"raw pixels: kNN {knn_top1(lambda x: x[:, 0].flatten(1), bank, test):.4f}")
    knn = [encoder_knn()]
    print(f"epoch 0: kNN {knn[0]:.4f}", flush=True)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train[0]))
        for s in range(steps_per_epoch):
            batch = train[0][order[s * args.batch_size : (s + 1) * args.batch_size]]
            v1 = normalize(torch.stack([view(x) for x in batch]))
            v2 = normalize(torch.stack([view(x) for x in batch]))
            loss = loss_fn(model(v1), model(v2))
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
        knn.append(encoder_knn())
        print(f"epoch {epoch + 1}: kNN {knn[-1]:.4f} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"PyTorch kNN {knn[0]:.4f} -> {knn[-1]:.4f} ({100 * (knn[-1] - knn[0]):+.1f} points) {vars(args)}")


if __name__ == "__main__":
    main()
