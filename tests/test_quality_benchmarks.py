"""The quality benchmark scripts run end to end on a tiny budget (no accuracy is asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
TINY = ROOT / "tests" / "conf" / "tiny_vit.yaml"


def run(args, tmp_path):
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def feature_pooling_module():
    """benchmarks/feature_pooling.py imported as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("feature_pooling", ROOT / "benchmarks" / "feature_pooling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_block_vit(img_size):
    """A 1-block, 8-wide ViT with 16-px patches: (img_size / 16)^2 patch tokens after a class token."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                             patch_size=16, depth=1, embed_dim=8, num_heads=1)


def pooling_names(tmp_path, *flags):
    """The pooling names feature_pooling.py prints for tiny_resnet.yaml at random init."""
    out = run([str(ROOT / "benchmarks" / "feature_pooling.py"), "--config", str(ROOT / "tests" / "conf" / "tiny_resnet.yaml"),
               "--random-init", *flags], tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("random init |")]
    return [line.split("|")[1].split()[0] for line in lines]


def test_fashion_mnist_benchmark_script(tmp_path):
    out = run([str(ROOT / "benchmarks" / "fashion_mnist.py"), "--config", str(TINY), "--minutes", "0.02",
               "--eval-every", "0.01", "--out", str(tmp_path / "bench")], tmp_path)
    assert "final k-NN top1" in out and "raw pixels" in out and "random init" in out
    assert (tmp_path / "bench" / "curve.png").is_file()
    lines = (tmp_path / "bench" / "curve.csv").read_text().splitlines()
    assert lines[0] == "minutes,epoch,step,top1,top5" and len(lines) >= 3


def test_collapse_study_script(tmp_path):
    out = run([str(ROOT / "benchmarks" / "collapse_study.py"), "--config", str(TINY), "--steps", "3",
               "--bank-size", "0", "--out", str(tmp_path / "collapse")], tmp_path)
    for variant in ("DINO", "no centring", "no sharpening", "no momentum"):
        assert f"| {variant} |" in out
    assert (tmp_path / "collapse" / "collapse.png").is_file()


def test_feature_pooling_script(tmp_path):
    assert pooling_names(tmp_path) == ["avg", "max", "grid2", "flatten"]


def test_pooled_features_match_the_backbone():
    import timm
    import torch

    module = feature_pooling_module()
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=[8, 8, 8, 8])
    images, labels = torch.randn(6, 3, 64, 64), torch.arange(6)
    feats, got_labels = module.pooled_features(backbone, [(images[:4], labels[:4]), (images[4:], labels[4:])])
    with torch.no_grad():
        fmap = backbone.eval().forward_features(images)  # (6, 8, 2, 2)
    torch.testing.assert_close(feats["avg"], backbone(images))  # timm's own average pooling
    torch.testing.assert_close(feats["max"], fmap.flatten(2).max(dim=2).values)
    torch.testing.assert_close(feats["grid2"], fmap.flatten(1))  # a 2x2 map is its own 2x2 grid
    assert feats["flatten"].shape == (6, 8 * 2 * 2) and torch.equal(got_labels, labels)


def test_pooled_vit_tokens_match_independent_computations():
    import torch

    module = feature_pooling_module()
    torch.manual_seed(0)
    vit = one_block_vit(32)
    images, labels = torch.randn(3, 3, 32, 32), torch.arange(3)
    feats, _ = module.pooled_features(vit, [(images, labels)])
    with torch.no_grad():
        tokens = vit.eval().forward_features(images)  # (3, 1 + 4, 8): a 2x2 patch map is its own 2x2 grid
    patches = tokens[:, 1:]
    torch.testing.assert_close(feats["cls"], vit(images))  # timm's own class-token pooling
    torch.testing.assert_close(feats["avg"], patches.mean(1))
    torch.testing.assert_close(feats["grid2"], patches.transpose(1, 2).flatten(1))  # channel-major
    torch.testing.assert_close(feats["cls+grid2"], torch.cat([tokens[:, 0], feats["grid2"]], 1))
    torch.testing.assert_close(feats["flatten"], patches.flatten(1))


def test_pooled_features_follow_the_grid_argument():
    import timm
    import torch

    module = feature_pooling_module()
    torch.manual_seed(0)
    vit = one_block_vit(48)
    images, labels = torch.randn(3, 3, 48, 48), torch.arange(3)
    feats, _ = module.pooled_features(vit, [(images, labels)], grid=3)
    with torch.no_grad():
        tokens = vit.eval().forward_features(images)  # (3, 1 + 9, 8): a 3x3 patch map is its own 3x3 grid
    assert set(feats) == {"cls", "avg", "grid3", "cls+grid3", "flatten"}
    torch.testing.assert_close(feats["grid3"], tokens[:, 1:].transpose(1, 2).flatten(1))
    torch.testing.assert_close(feats["cls+grid3"], torch.cat([tokens[:, 0], feats["grid3"]], 1))
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=[8, 8, 8, 8])
    cnn_feats, _ = module.pooled_features(cnn, [(images, labels)], grid=1)
    torch.testing.assert_close(cnn_feats["grid1"], cnn_feats["avg"])  # a 1x1 grid is the average


def test_feature_pooling_script_reads_the_grid_of_the_config(tmp_path):
    assert pooling_names(tmp_path, "--model.feature_grid=3") == ["avg", "max", "grid3", "flatten"]
