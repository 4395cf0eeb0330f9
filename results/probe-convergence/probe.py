"""Is dcl's linear probe (L2-normalized, standardized features; 300 full-batch Adam steps at 0.01
from zero) converged? Compares it with the same logistic regression run to convergence (L-BFGS),
on the encoder of a run and on raw pixels. Diagnostic."""
import sys, time, numpy as np, torch
sys.path.insert(0, __file__.rsplit("/results/", 1)[0] + "/scripts")
from pytorch_embed import read_safetensors, architecture, Encoder
from pytorch_knn import split, normalize
torch.set_num_threads(2)
root = "/usr/share/datasets/fashion-mnist"
train, test = split(root, "train"), split(root, "t10k")

def feats_of(model):
    with torch.no_grad():
        return torch.cat([model(normalize(b))[0] for b in train[0].split(1000)]), \
               torch.cat([model(normalize(b))[0] for b in test[0].split(1000)])

def prep(xtr, xte):
    xtr, xte = [torch.nn.functional.normalize(x.double().flatten(1), dim=1) for x in (xtr, xte)]
    m, s = xtr.mean(0), xtr.std(0, unbiased=False)
    scale = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    return ((xtr - m) * scale).float(), ((xte - m) * scale).float()

def adam300(xtr, ytr, xte, yte, steps=300):
    lin = torch.nn.Linear(xtr.shape[1], 10); torch.nn.init.zeros_(lin.weight); torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad(); l = torch.nn.functional.cross_entropy(lin(xtr), ytr); l.backward(); opt.step()
    return (lin(xte).argmax(1) == yte).float().mean().item(), l.item()

def lbfgs(xtr, ytr, xte, yte, wd=0.0, iters=1000):
    lin = torch.nn.Linear(xtr.shape[1], 10).double(); torch.nn.init.zeros_(lin.weight); torch.nn.init.zeros_(lin.bias)
    xtr, xte = xtr.double(), xte.double()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-7, tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); l = torch.nn.functional.cross_entropy(lin(xtr), ytr) + wd * lin.weight.pow(2).sum(); l.backward(); return l
    opt.step(closure)
    l = torch.nn.functional.cross_entropy(lin(xtr), ytr).item()
    return (lin(xte).argmax(1) == yte).float().mean().item(), l, (lin(xtr).argmax(1) == ytr).float().mean().item()

def report(name, xtr, xte):
    xtr, xte = prep(xtr, xte)
    ytr, yte = train[1], test[1]
    t = time.time()
    print(name, "adam300 (test acc, train loss)", adam300(xtr, ytr, xte, yte), f"{time.time()-t:.0f}s", flush=True)
    print(name, "adam3000", adam300(xtr, ytr, xte, yte, 3000), flush=True)
    for wd in [0.0, 1e-4, 1e-3]:
        print(name, f"lbfgs wd={wd} (test acc, train loss, train acc)", lbfgs(xtr, ytr, xte, yte, wd), flush=True)

for run in sys.argv[1:]:
    t = read_safetensors(run)
    model = Encoder(*architecture(t)); model.load_state_dict(t, strict=True); model.eval()
    report(run, *feats_of(model))
report("pixels", train[0][:, :1], test[0][:, :1])
