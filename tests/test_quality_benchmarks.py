"""The quality benchmark scripts run end to end on a tiny budget (no accuracy is asserted)."""

import subprocess
import sys
from pathlib import Path

import torch

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


def test_plot_curves_reads_the_benchmark_csv_and_writes_the_figure(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_curves", ROOT / "benchmarks" / "plot_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    csv_file = tmp_path / "curve.csv"
    csv_file.write_text("minutes,epoch,step,top1,top5\n0.0,0,0,0.2,0.5\n4.0,2,1044,0.8437,0.98\n")
    assert module.read_curve(csv_file) == ([0.0, 4.0], [20.0, 84.37])
    out = tmp_path / "figure.png"
    module.main(["--out", str(out), "--curve", f"a run={csv_file}", "--line", "raw pixels=85.69"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collapse_study_script(tmp_path):
    out = run([str(ROOT / "benchmarks" / "collapse_study.py"), "--config", str(TINY), "--steps", "3",
               "--bank-size", "0", "--out", str(tmp_path / "collapse")], tmp_path)
    for variant in ("DINO", "no centring", "no sharpening", "no momentum"):
        assert f"| {variant} |" in out
    assert (tmp_path / "collapse" / "collapse.png").is_file()


def test_feature_pooling_script(tmp_path):
    assert pooling_names(tmp_path) == ["avg", "max", "grid2", "flatten"]


def grid_means_by_slicing(fmap, grid):
    """(B, C, H, W) -> (B, C * grid * grid): the mean of each of the grid x grid equal blocks of
    the map, cut out by slicing, channel-major (channel, block row, block column)."""
    _, _, h, w = fmap.shape
    kh, kw = h // grid, w // grid
    assert kh * grid == h and kw * grid == w and kh > 1 and kw > 1  # larger than the grid
    rows = [torch.stack([fmap[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean((2, 3)) for j in range(grid)], -1)
            for i in range(grid)]
    return torch.stack(rows, -2).flatten(1)


def token_grid_means(patches, side, grid):
    """(B, side * side, C) patch tokens in row-major order -> (B, C * grid * grid): the mean of
    the tokens of each block of the grid, found by their indices, channel-major."""
    k = side // grid
    assert k * grid == side and k > 1
    cells = []
    for i in range(grid):
        for j in range(grid):
            index = [r * side + c for r in range(i * k, (i + 1) * k) for c in range(j * k, (j + 1) * k)]
            cells.append(patches[:, index].mean(1))  # (B, C)
    return torch.stack(cells, -1).flatten(1)  # (B, C, grid * grid) -> channel-major


def test_pooled_features_match_the_backbone():
    import timm

    module = feature_pooling_module()
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=[8, 8, 8, 8])
    images, labels = torch.randn(6, 3, 128, 128), torch.arange(6)
    feats, got_labels = module.pooled_features(backbone, [(images[:4], labels[:4]), (images[4:], labels[4:])])
    with torch.no_grad():
        fmap = backbone.eval().forward_features(images)
    assert fmap.shape == (6, 8, 4, 4)  # a 4x4 map: the 2x2 grid averages 2x2 blocks
    torch.testing.assert_close(feats["avg"], backbone(images))  # timm's own average pooling
    torch.testing.assert_close(feats["max"], fmap.flatten(2).max(dim=2).values)
    torch.testing.assert_close(feats["grid2"], grid_means_by_slicing(fmap, 2))
    torch.testing.assert_close(feats["flatten"], fmap.flatten(1))
    assert feats["flatten"].shape == (6, 8 * 4 * 4) and torch.equal(got_labels, labels)


def test_pooled_vit_tokens_match_independent_computations():
    module = feature_pooling_module()
    torch.manual_seed(0)
    vit = one_block_vit(64)
    images, labels = torch.randn(3, 3, 64, 64), torch.arange(3)
    feats, _ = module.pooled_features(vit, [(images, labels)])
    with torch.no_grad():
        tokens = vit.eval().forward_features(images)
    assert tokens.shape == (3, 1 + 16, 8)  # a 4x4 patch map: the 2x2 grid averages 2x2 blocks
    patches = tokens[:, 1:]
    torch.testing.assert_close(feats["cls"], vit(images))  # timm's own class-token pooling
    torch.testing.assert_close(feats["avg"], patches.mean(1))
    torch.testing.assert_close(feats["grid2"], token_grid_means(patches, 4, 2))
    torch.testing.assert_close(feats["cls+grid2"], torch.cat([tokens[:, 0], token_grid_means(patches, 4, 2)], 1))
    torch.testing.assert_close(feats["flatten"], patches.flatten(1))


def test_pooled_features_follow_the_grid_argument():
    import timm

    module = feature_pooling_module()
    torch.manual_seed(0)
    vit = one_block_vit(96)
    images, labels = torch.randn(3, 3, 96, 96), torch.arange(3)
    feats, _ = module.pooled_features(vit, [(images, labels)], grid=3)
    with torch.no_grad():
        tokens = vit.eval().forward_features(images)
    assert tokens.shape == (3, 1 + 36, 8)  # a 6x6 patch map: the 3x3 grid averages 2x2 blocks
    assert set(feats) == {"cls", "avg", "grid3", "cls+grid3", "flatten"}
    torch.testing.assert_close(feats["grid3"], token_grid_means(tokens[:, 1:], 6, 3))
    torch.testing.assert_close(feats["cls+grid3"], torch.cat([tokens[:, 0], feats["grid3"]], 1))
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=[8, 8, 8, 8])
    cnn_feats, _ = module.pooled_features(cnn, [(images, labels)], grid=1)
    assert cnn_feats["flatten"].shape == (3, 8 * 3 * 3)  # a 3x3 map
    torch.testing.assert_close(cnn_feats["grid1"], cnn_feats["avg"])  # a 1x1 grid is the average


def test_feature_pooling_script_reads_the_grid_of_the_config(tmp_path):
    assert pooling_names(tmp_path, "--model.feature_grid=3") == ["avg", "max", "grid3", "flatten"]
