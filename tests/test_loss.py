import math

import torch
import torch.nn.functional as F

from model.loss import ClipLoss


def _hand_loss(img, txt, scale):
    # Direct transcription of the symmetric InfoNCE formula, row by row.
    n = img.shape[0]
    total_i2t = total_t2i = 0.0
    for i in range(n):
        logits_i = [scale * float(img[i] @ txt[j]) for j in range(n)]
        total_i2t += -logits_i[i] + math.log(sum(math.exp(v) for v in logits_i))
        logits_t = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total_t2i += -logits_t[i] + math.log(sum(math.exp(v) for v in logits_t))
    return (total_i2t / n + total_t2i / n) / 2


def test_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    got = ClipLoss()(img, txt, torch.tensor(10.0))
    assert abs(float(got) - _hand_loss(img, txt, 10.0)) < 1e-5


def test_symmetric_in_its_two_arguments():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    loss = ClipLoss()
    assert torch.allclose(loss(img, txt, torch.tensor(5.0)), loss(txt, img, torch.tensor(5.0)))


def test_aligned_pairs_score_lower_than_shuffled():
    emb = F.normalize(torch.eye(4), dim=-1)
    loss = ClipLoss()
    aligned = loss(emb, emb, torch.tensor(20.0))
    shuffled = loss(emb, emb[[1, 2, 3, 0]], torch.tensor(20.0))
    assert aligned < 0.01 < shuffled


def test_two_by_two_closed_form():
    # Orthogonal unit vectors at scale s: each row has logits (s, 0) -> loss log(1 + e^-s).
    img = torch.eye(2)
    s = 3.0
    got = ClipLoss()(img, img, torch.tensor(s))
    assert abs(float(got) - math.log(1 + math.exp(-s))) < 1e-6
