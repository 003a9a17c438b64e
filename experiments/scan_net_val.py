"""Choosing scan-net's epochs on the validation part of the training split (labels of that part only).

``cluster --method scan-net`` run on the 6,000 images of the validation part ``eval``
holds out of the Fashion-MNIST training split, scored against their labels; the test
split is not touched. One result line per call, appended to ``experiments/scan_net_val.jsonl``:

    OMP_NUM_THREADS=1 python experiments/scan_net_val.py EPOCHS SELFLABEL_EPOCHS SEED [RUN]

(experiments/CLUSTERS-scan-net.md).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
from deepcluster.eval import open_checkpoint
from deepcluster.checkpoint import saved_config
from deepcluster.data import train_transform_from, Subset
from deepcluster.scan_net import scan_network
from deepcluster.metrics import nmi, hungarian_accuracy
epochs, sl, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
run = sys.argv[4] if len(sys.argv) > 4 else "runs/fmnist-full"
ctx = open_checkpoint(run, protocol="cluster", workers=0)
x = np.asarray(ctx.store.get("train", ["fc7"])["fc7"], dtype=np.float32)
val = np.asarray(ctx.data.val)
src = Subset(ctx.data.train, val)
y = np.asarray(ctx.data.train_labels)[val]
cfg = saved_config(ctx.state)
t = time.perf_counter()
res, net = scan_network(ctx.model, src, x[val], 10, spec=ctx.data.spec, weak=train_transform_from(ctx.data.spec, cfg.augment),
                        seed=seed, epochs=epochs, selflabel_epochs=sl, amp="bf16", channels_last=True, workers=0)
out = {"epochs": epochs, "selflabel": sl, "seed": seed, "n": len(val), "nmi": nmi(res.assignments, y),
       "acc": hungarian_accuracy(res.assignments, y), "seconds": time.perf_counter() - t, "sizes": res.info["sizes"]}
print(json.dumps(out))
open(Path(__file__).with_name("scan_net_val.jsonl"), "a").write(json.dumps(out) + "\n")
