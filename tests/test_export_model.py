"""export-model: the trained backbone leaves the package and gives the same features.

References are the training model itself (``DeepClusterNet.forward_features`` with its
Sobel layer), computed in this process; the exports are read back by torch alone in a
subprocess that cannot import ``deepcluster``, by torchvision, torch.hub, TorchScript and
onnxruntime.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deepcluster import __version__, standalone
from deepcluster.checkpoint import save_checkpoint
from deepcluster.cli import main
from deepcluster.cli.export_model import FORMATS as CLI_FORMATS
from deepcluster.data import image_spec
from deepcluster.export_model import FORMATS, ExportError, export_model, resolve_checkpoint
from deepcluster.hub import load_backbone
from deepcluster.models import create_model
from deepcluster.models.fold import border_mask, exact_front, fold_conv, sobel_rgb_conv

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def trained_like(arch, size, seed=0, **kwargs):
    """A randomly initialised model whose BN layers have non-trivial running stats and affine
    parameters (an untrained model's are 0/1, which would hide a misplaced BN)."""
    torch.manual_seed(seed)
    model = create_model(arch, image_size=size, num_clusters=7, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def save_run(model, path, arch, epoch=3, **meta):
    """A checkpoint as training writes it (the keys export-model reads)."""
    full = {"arch": arch, "sobel": not isinstance(model.sobel, nn.Identity), "image_size": model.image_size,
            "fc_dim": None, "width": None, "cluster_feature": model.cluster_feature,
            "projection_dim": model.projection_dim, "k": 7, "num_images": 240, "data": "fashion-mnist", **meta}
    save_checkpoint({"model": model.state_dict(), "meta": full, "epoch": epoch,
                     "config": {"optim": {"temperature": 0.1}}}, path)
    return path


def images(size, n=3, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()


# --------------------------------------------------------------------------- the fold

@pytest.mark.parametrize("arch,size", [("alexnet_small", 28), ("alexnet", 224), ("vgg16", 40)])
def test_fold_front_end(arch, size):
    """The exported front end (grey folded into Sobel, then conv1) equals Sobel -> conv1
    everywhere; the single (k+2) conv equals it exactly off the border ring the geometry
    predicts, and differs on every position of that ring."""
    torch.manual_seed(0)
    model = create_model(arch, image_size=size).eval()
    conv1, x = model.features[0], images(size, n=4)
    with torch.no_grad():
        ref = conv1(model.sobel(x))
        assert max_diff(exact_front(model.sobel, conv1)(x), ref) <= TOL
        diff = (fold_conv(sobel_rgb_conv(model.sobel), conv1)(x) - ref).abs().amax((0, 1))  # (H_out, W_out)
    (k, _), (s, _), (p, _) = conv1.kernel_size, conv1.stride, conv1.padding
    rows = torch.tensor([i * s - p <= -1 or i * s - p + k - 1 >= size for i in range(diff.shape[0])])
    border = rows[:, None] | rows[None, :]  # windows reaching Sobel row/column -1 or H
    assert torch.equal(border_mask(conv1, size, size), border)
    assert diff[~border].max() <= TOL
    assert diff[border].min() > 1e-3


# --------------------------------------------------------------------------- safetensors

# Run with ``python -I`` and an import hook that refuses ``deepcluster`` (the venv may have
# it installed): the copied standalone.py, then hubconf.py through torch.hub, offline.
_CHILD = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deepcluster":
            raise ImportError("deepcluster must not be imported here")
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import torch, standalone
from safetensors.torch import load_file
weights, inputs, out, repo, arch = sys.argv[2:7]
model = standalone.load(weights)
tensors, _ = standalone.read_safetensors(weights)
ref = load_file(weights)
assert tensors.keys() == ref.keys() and all(torch.equal(tensors[k], ref[k]) for k in ref)
hub = torch.hub.load(repo, "deepcluster_" + arch, source="local", weights=weights)  # hubconf.py, offline
with torch.no_grad():
    x = torch.load(inputs, weights_only=True)
    torch.save(torch.stack([model.forward_features(x), hub.forward_features(x)]), out)
assert not any(m.split(".")[0] == "deepcluster" for m in sys.modules), sorted(sys.modules)
"""


@pytest.mark.parametrize("arch,size,fc_dim", [("alexnet_small", 28, None), ("alexnet", 224, 512)])
def test_standalone_file_and_hub_alone_give_the_training_features(arch, size, fc_dim, tmp_path):
    # alexnet's fc layers at 512 instead of 4096 (its conv stack unchanged): a 20 MB file, not 240 MB
    model = trained_like(arch, size, **({"fc_dim": fc_dim} if fc_dim else {}))
    ckpt = save_run(model, tmp_path / "checkpoint.pt", arch, fc_dim=fc_dim)
    weights = export_model(ckpt, "safetensors", tmp_path / "backbone.safetensors")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "src" / "deepcluster" / "standalone.py", alone)
    x = images(size)
    torch.save(x, tmp_path / "x.pt")
    res = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(alone), str(weights), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt"), str(ROOT), arch], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    standalone_feats, hub_feats = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        assert max_diff(standalone_feats, model.forward_features(x)) <= TOL
        assert max_diff(hub_feats, model.forward_features(x)) <= TOL


@pytest.mark.parametrize("kwargs", [{"sobel": False}, {"cluster_feature": "projection"},
                                    {"cluster_feature": "backbone"}])
def test_variants_round_trip(kwargs, tmp_path):
    """Without Sobel, with a projection, clustering the conv output: features and logits."""
    model = trained_like("alexnet_small", 28, **kwargs)
    weights = export_model(save_run(model, tmp_path / "c.pt", "alexnet_small"), "safetensors", tmp_path / "b.st")
    loaded, x = standalone.load(str(weights)), images(28)
    with torch.no_grad():
        assert loaded.forward_features(x).shape == model.forward_features(x).shape
        assert max_diff(loaded.forward_features(x), model.forward_features(x)) <= TOL
        assert max_diff(loaded(x), model(x)) <= TOL
        conv = loaded.forward_conv(x, ["conv2", "conv5"])
        ref = model.forward_conv(x, ["conv2", "conv5"])
        assert all(max_diff(conv[n], ref[n]) <= TOL for n in ref)


def test_vgg16_loads_strict_into_torchvision(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import load_file

    model = trained_like("vgg16", 32)
    weights = export_model(save_run(model, tmp_path / "c.pt", "vgg16"), "safetensors", tmp_path / "vgg.safetensors")
    tv = torchvision.models.vgg16_bn(num_classes=7)
    # The documented one line for a Sobel model (docs/EXPORT.md): the fixed Sobel conv, then conv1.
    tv.features[0] = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1, bias=False),
                                         torch.nn.Conv2d(2, 64, 3, padding=1))
    tv.load_state_dict(load_file(weights), strict=True)
    tv.eval()
    x = images(32)
    with torch.no_grad():
        fc7 = tv.classifier[:4](torch.flatten(tv.avgpool(tv.features(x)), 1))
        assert max_diff(fc7, model.forward_features(x)) <= TOL
        assert max_diff(tv(x), model(x)) <= TOL


def test_vgg16_without_sobel_has_torchvision_keys_and_shapes():
    """Without Sobel no replacement is needed: the layout is vgg16_bn's, key for key."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # shapes only
        tv = torchvision.models.vgg16_bn(num_classes=7)
        ours = standalone.build({"arch": "vgg16", "sobel": False, "image_size": 32, "fc_dim": 4096, "num_classes": 7})
        trained = create_model("vgg16", image_size=32, sobel=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    assert ours.conv_layers == trained.conv_layers  # conv1 ... conv5 and conv{block}_{i}


def test_metadata_in_header(tmp_path):
    from safetensors import safe_open

    model = trained_like("alexnet_small", 28)
    weights = export_model(save_run(model, tmp_path / "c.pt", "alexnet_small", epoch=12), "safetensors",
                           tmp_path / "b.safetensors")
    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    spec = image_spec("fashion-mnist")
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert meta["architecture"] == "alexnet_small" and json.loads(meta["sobel"]) is True
    assert json.loads(meta["input_size"]) == [3, 28, 28]
    assert json.loads(meta["mean"]) == list(spec.mean) and json.loads(meta["std"]) == list(spec.std)
    assert meta["training_data"] == "fashion-mnist" and json.loads(meta["training_images"]) == 240
    assert json.loads(meta["epochs"]) == 12 and json.loads(meta["k"]) == 7
    assert meta["deepcluster_version"] == __version__
    assert meta["git_commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    assert json.loads(meta["meta"])["width"] == 0.5 and json.loads(meta["meta"])["fc_dim"] == 1024


# --------------------------------------------------------------------------- graphs and hub

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    model = trained_like("alexnet_small", 28, seed=4)
    save_run(model, d / "checkpoint.pt", "alexnet_small")
    return d, model


def test_torchscript_and_onnx_match(small_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    run, model = small_run
    x = images(28, n=5)  # another batch size than the traced one
    with torch.no_grad():
        ref = model.forward_features(x)
    extra = {"deepcluster.json": ""}
    scripted = torch.jit.load(str(export_model(run, "torchscript", tmp_path / "b.pt")), _extra_files=extra)
    assert max_diff(scripted(x), ref) <= TOL
    assert json.loads(extra["deepcluster.json"])["architecture"] == "alexnet_small"
    session = ort.InferenceSession(str(export_model(run, "onnx", tmp_path / "b.onnx")),
                                   providers=["CPUExecutionProvider"])
    assert max_diff(session.run(None, {"image": x.numpy()})[0], ref) <= TOL
    assert json.loads(session.get_modelmeta().custom_metadata_map["input_size"]) == [3, 28, 28]


def test_torch_hub_local_offline(small_run, tmp_path):
    run, model = small_run
    weights = export_model(run, "safetensors", tmp_path / "b.safetensors")
    hub = torch.hub.load(str(ROOT), "deepcluster_alexnet_small", source="local", weights=str(weights))
    x = images(28)
    with torch.no_grad():
        assert max_diff(hub.forward_features(x), model.forward_features(x)) <= TOL
    with pytest.raises(ValueError, match="not 'alexnet'"):
        torch.hub.load(str(ROOT), "deepcluster_alexnet", source="local", weights=str(weights))
    with pytest.raises(ValueError, match="weights=FILE"):
        torch.hub.load(str(ROOT), "deepcluster_vgg16", source="local")


def test_a_trained_run_exports(tiny_mnist_root, tmp_path):
    """A checkpoint written by ``train`` itself (every key it holds), through the CLI."""
    from conftest import train_tiny
    from deepcluster.checkpoint import load_model

    run = train_tiny(tiny_mnist_root, tmp_path / "run")
    out = tmp_path / "b.safetensors"
    assert main(["export-model", str(run), "-o", str(out)]) == 0
    model, state = load_model(run)
    x = images(28)
    with torch.no_grad():
        assert max_diff(standalone.load(str(out)).forward_features(x), model.forward_features(x)) <= TOL
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["epochs"]) == state["epoch"] == 2


def test_load_backbone_from_run_and_file(small_run, tmp_path):
    run, model = small_run
    x = images(28)
    with torch.no_grad():
        ref = model.forward_features(x)
        for source in (run, run / "checkpoint.pt", export_model(run, "safetensors", tmp_path / "b.safetensors")):
            backbone = load_backbone(source)
            assert not backbone.training and max_diff(backbone.forward_features(x), ref) <= TOL
            assert list(backbone.conv_layers) == list(model.conv_layers)


# --------------------------------------------------------------------------- CLI and bad input

def test_cli_epoch_selects_the_snapshot(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    models = {name: trained_like("alexnet_small", 28, seed=s)
              for s, name in enumerate(["checkpoint.pt", "checkpoint-epoch2.pt", "best.pt"])}
    for name, model in models.items():
        save_run(model, run / name, "alexnet_small")
    x = images(28)
    for epoch, name in ((None, "checkpoint.pt"), ("2", "checkpoint-epoch2.pt"), ("best", "best.pt")):
        out = tmp_path / f"{name}.safetensors"
        assert main(["export-model", str(run), "-o", str(out)] + (["--epoch", epoch] if epoch else [])) == 0
        with torch.no_grad():
            assert max_diff(standalone.load(str(out)).forward_features(x), models[name].forward_features(x)) <= TOL


def _one_line_error(argv, capsys, *needles):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("deepcluster: error:"), err
    for needle in needles:
        assert needle in err, err


def test_bad_input_one_line_errors(small_run, tmp_path, capsys):
    run, model = small_run
    out = str(tmp_path / "b.safetensors")
    save_run(model, tmp_path / "resnet.pt", "resnet50")
    _one_line_error(["export-model", str(tmp_path / "resnet.pt"), "-o", out], capsys, "'resnet50'")
    _one_line_error(["export-model", str(tmp_path / "nope"), "-o", out], capsys, "nope")
    _one_line_error(["export-model", str(run), "--epoch", "9", "-o", out], capsys, "checkpoint-epoch9.pt",
                    "checkpoint.pt)")
    _one_line_error(["export-model", str(run), "--epoch", "last", "-o", out], capsys, "'last'")
    _one_line_error(["export-model", str(run), "--epoch", "best", "-o", out], capsys, "best.pt")
    assert not Path(out).exists()
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(run, "pickle", out)
    with pytest.raises(ExportError, match="no exported backbone"):
        load_backbone(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="no 'meta' entry"):
        load_backbone(tmp_path / "foreign.safetensors")
    meta = {"meta": json.dumps({"arch": "alexnet_small", "sobel": True, "image_size": 28, "fc_dim": 64,
                                "width": 0.25, "num_classes": 3})}
    save_file({"features.0.0.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "partial.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="does not fit its own header"):
        load_backbone(tmp_path / "partial.safetensors")
    assert resolve_checkpoint(run) == run / "checkpoint.pt"
    assert tuple(CLI_FORMATS) == FORMATS
