"""Issue 21, session 19: do conv-layer features cluster Fashion-MNIST better than fc7?

The finished 48-epoch preset network (/work/runs/fmnist-full), the validation part of the
training split (images 50,000-59,999), each feature set L2-normalised and reduced to 50
dimensions (benchmarks/final_clustering.reduce), spectral clustering and k-means at K = 10,
3 seeds each. Results and reading: CLUSTERS-layers.md."""
import sys, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import numpy as np, torch
from final_clustering import reduce, run_method
from deepcluster.checkpoint import load_model
from deepcluster.data import IndexedDataset, build_source, cluster_transform, image_spec, Subset
torch.set_num_threads(1)
CHECKPOINT = sys.argv[1] if len(sys.argv) > 1 else "/work/runs/fmnist-full/checkpoint.pt"
model, state = load_model(CHECKPOINT)
model.eval()
src = build_source("fashion-mnist", split="train")
idx = np.arange(50000, 60000)
sub = Subset(src, idx)
y = np.asarray(src.labels)[idx]
ds = IndexedDataset(sub, cluster_transform(image_spec("fashion-mnist", 28)))
loader = torch.utils.data.DataLoader(ds, batch_size=500)
feats = {k: [] for k in ("fc7", "conv5_gap", "conv4_gap", "conv3_gap", "conv4_2x2", "conv5_2x2")}
layers = list(model.conv_layers)
print(layers, flush=True)
with torch.no_grad():
    for x, _ in loader:
        conv = model.forward_conv(x, layers[2:])
        feats["fc7"].append(model.forward_fc7(x))
        for name, key in ((layers[4], "conv5"), (layers[3], "conv4"), (layers[2], "conv3")):
            h = conv[name]
            feats[key + "_gap"].append(h.mean((2, 3)))
            if key in ("conv4", "conv5"):
                feats[key + "_2x2"].append(torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))
feats = {k: torch.cat(v).numpy() for k, v in feats.items()}
res = {}
for name, f in feats.items():
    z = reduce(f)
    for method in ("spectral", "kmeans"):
        runs = [run_method(method, z, y, s) for s in range(3)]
        nmi = np.mean([r["nmi"] for r in runs]); acc = np.mean([r["acc"] for r in runs])
        res[f"{name}/{method}"] = (nmi, acc)
        print(f"{name:10s} {method:9s} NMI {nmi:.3f} ACC {acc:.3f} ({f.shape[1]} d)", flush=True)
print(json.dumps(res))
