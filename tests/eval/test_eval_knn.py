import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_dino.eval import extract_features, knn_accuracy, knn_predict


def brute_force_knn(train_f, train_l, test_f, test_l, k, temperature, num_classes):
    """Per-query loop in float64: vote exp(cos / T) for the k most similar training samples."""
    train_f, test_f = train_f.double(), test_f.double()
    top1 = top5 = 0
    for query, label in zip(test_f, test_l.tolist(), strict=True):
        sims = [float(query @ t / (query.norm() * t.norm())) for t in train_f]
        neighbours = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        scores = [0.0] * num_classes
        for i in neighbours:
            scores[int(train_l[i])] += math.exp(sims[i] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: -scores[c])
        if scores[label] > 0:
            top1 += ranking[0] == label
            top5 += label in ranking[: min(5, num_classes)]
    return top1 / len(test_l), top5 / len(test_l)


@pytest.mark.parametrize(
    ("k", "temperature", "num_classes", "chunk_size"),
    [(20, 0.07, 10, 7), (1, 0.07, 3, 1000), (5, 0.5, 4, 1), (50, 0.1, 7, 16), (200, 0.07, 2, 5)],
)
def test_knn_accuracy_matches_brute_force(k, temperature, num_classes, chunk_size):
    gen = torch.Generator().manual_seed(k + num_classes)
    train_f, test_f = torch.randn(120, 6, generator=gen), torch.randn(23, 6, generator=gen)
    train_l = torch.randint(num_classes, (120,), generator=gen)
    test_l = torch.randint(num_classes, (23,), generator=gen)
    expected = brute_force_knn(train_f, train_l, test_f, test_l, k, temperature, num_classes)
    got = knn_accuracy(
        train_f, train_l, test_f, test_l, k, temperature, num_classes, chunk_size=chunk_size
    )
    assert got == pytest.approx(expected, abs=1e-9)
    assert got[1] >= got[0]


def test_knn_accuracy_infers_num_classes_from_both_splits():
    # Class 5 only appears in the test labels: it can never be predicted, but must not crash.
    train_f, train_l = torch.eye(3), torch.arange(3)
    top1, top5 = knn_accuracy(train_f, train_l, torch.eye(3), torch.tensor([0, 1, 5]), k=1)
    assert (top1, top5) == pytest.approx((2 / 3, 2 / 3))


def test_well_separated_clusters_are_perfect():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=gen) * 10
    train_l, test_l = torch.arange(5).repeat(30), torch.arange(5).repeat(4)
    train_f = centres[train_l] + torch.randn(150, 32, generator=gen)
    test_f = centres[test_l] + torch.randn(20, 32, generator=gen)
    assert knn_accuracy(train_f, train_l, test_f, test_l, k=20) == (1.0, 1.0)


def test_known_accuracy_with_relabelled_nearest_neighbours():
    # Each query is a copy of one training sample; with k=1 it predicts that sample's label.
    # Half the queries carry a different label, and classes without votes never count: 0.5/0.5.
    train_f = torch.randn(40, 16, generator=torch.Generator().manual_seed(1))
    train_l = torch.arange(40) % 8
    test_l = train_l.clone()
    test_l[::2] = (test_l[::2] + 1) % 8
    assert knn_accuracy(train_f, train_l, train_f, test_l, k=1) == (0.5, 0.5)


def test_knn_predict_scores_and_k_clamped():
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    scores = knn_predict(train_f, torch.tensor([0, 1, 0]), torch.tensor([[2.0, 0.0]]), k=10)
    cos = torch.nn.functional.cosine_similarity(train_f, torch.tensor([[1.0, 0.0]]))
    votes = (cos / 0.07).exp()
    assert scores.shape == (1, 2)
    torch.testing.assert_close(scores[0], torch.stack([votes[0] + votes[2], votes[1]]))


def test_extract_features_restores_mode_and_order():
    backbone = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.Dropout(0.5)
    )
    backbone.train()
    images, labels = torch.randn(10, 3, 2, 2), torch.arange(10)
    loader = DataLoader(TensorDataset(images, labels), batch_size=3)
    features, got_labels = extract_features(backbone, loader, progress=False)
    assert backbone.training
    assert features.dtype == torch.float32 and features.shape == (10, 4)
    assert torch.equal(got_labels, labels)
    backbone.eval()
    torch.testing.assert_close(features, backbone(images))
