import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from model.metrics import retrieval_metrics, retrieval_metrics_from_scores

ROOT = Path(__file__).resolve().parents[1]


def test_perfect_similarity_gives_recall_one():
    # 3 images, 2 captions each; captions 2i, 2i+1 describe image i.
    cap_img = np.array([0, 0, 1, 1, 2, 2])
    sim = (np.arange(3)[:, None] == cap_img[None, :]).astype(float)
    m = retrieval_metrics_from_scores(sim, cap_img, ks=(1, 5))
    assert m["i2t_R1"] == m["t2i_R1"] == 1.0
    assert m["i2t_mean_rank"] == m["t2i_median_rank"] == 1.0


def test_hand_made_ranks():
    cap_img = np.array([0, 1, 2])
    sim = np.array(
        [
            [0.1, 0.9, 0.5],  # image 0: its caption ranks 3rd
            [0.2, 0.8, 0.1],  # image 1: 1st
            [0.7, 0.0, 0.6],  # image 2: 2nd
        ]
    )
    m = retrieval_metrics_from_scores(sim, cap_img, ks=(1, 2))
    assert m["i2t_R1"] == pytest.approx(1 / 3)
    assert m["i2t_R2"] == pytest.approx(2 / 3)
    assert m["i2t_mean_rank"] == pytest.approx(2.0)
    assert m["i2t_median_rank"] == 2.0
    # Column view: caption 0 -> images (0.1, 0.2, 0.7): its image 0 ranks 3rd;
    # caption 1 -> (0.9, 0.8, 0.0): image 1 ranks 2nd; caption 2 -> (0.5, 0.1, 0.6): image 2 1st.
    assert m["t2i_R1"] == pytest.approx(1 / 3)
    assert m["t2i_R2"] == pytest.approx(2 / 3)
    assert m["t2i_mean_rank"] == pytest.approx(2.0)


def test_image_query_counts_any_of_its_captions():
    # Image 0 has captions 0 and 1; only caption 1 is retrieved first: still R@1 = 1 for image 0.
    cap_img = np.array([0, 0, 1])
    sim = np.array([[0.0, 0.9, 0.5], [0.1, 0.2, 0.8]])
    m = retrieval_metrics_from_scores(sim, cap_img, ks=(1,))
    assert m["i2t_R1"] == 1.0
    # Caption 0 ranks image 1 above image 0: t2i R@1 = 2/3.
    assert m["t2i_R1"] == pytest.approx(2 / 3)


def test_rejects_mismatched_shapes_and_uncaptioned_images():
    with pytest.raises(ValueError, match="N_cap"):
        retrieval_metrics_from_scores(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics_from_scores(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="N_cap"):
        retrieval_metrics(np.zeros((2, 4)), np.zeros((3, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="N_cap"):
        retrieval_metrics(np.zeros((2, 4)), np.zeros((2, 5)), np.array([0, 1]))
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(np.zeros((3, 4)), np.zeros((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match="must index images"):
        retrieval_metrics(np.zeros((2, 4)), np.zeros((3, 4)), np.array([0, 1, 2]))


def test_retrieval_examples_rank_and_mark_by_hand():
    from tasks.evaluate import retrieval_examples

    cap_img = np.array([0, 0, 1, 1, 2, 2])  # captions 2i, 2i+1 describe image i
    sim = np.array(
        [
            [0.9, 0.1, 0.8, 0.0, 0.3, 0.2],
            [0.2, 0.7, 0.1, 0.6, 0.0, 0.4],
            [0.1, 0.3, 0.5, 0.2, 0.9, 0.1],
        ]
    )
    eye = np.eye(6)  # sim @ eye == sim exactly
    by_text, by_image = retrieval_examples(sim, eye, cap_img, queries=2, k=2)
    # Caption queries 0 and 5 (evenly spaced); caption 5's own image 2 ranks last, outside k.
    assert by_text == [(0, [(0, True), (1, False)]), (5, [(1, False), (0, False)])]
    # Image queries 0 and 2; each one's second caption is image 1's.
    assert by_image == [(0, [(0, True), (2, False)]), (2, [(4, True), (2, False)])]
    # k larger than the split is cut to it.
    assert len(retrieval_examples(sim, eye, cap_img, queries=1, k=10)[0][0][1]) == 3


def _sorted_metrics(
    sim: np.ndarray, caption_image: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """The reference: retrieval_metrics as it was before issue 16, full stable argsorts."""
    sim = np.asarray(sim, dtype=np.float64)
    order = np.argsort(-sim, axis=1, kind="stable")
    i2t = (caption_image[order] == np.arange(sim.shape[0])[:, None]).argmax(axis=1)
    t2i = (np.argsort(-sim.T, axis=1, kind="stable") == caption_image[:, None]).argmax(axis=1)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R{k}"] = float(np.mean(ranks < k))
        out[f"{name}_mean_rank"] = float(np.mean(ranks + 1))
        out[f"{name}_median_rank"] = float(np.median(ranks + 1))
    return out


def _split(seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings whose dot products are exact in float32 whatever the summation order (so a
    chunk's scores equal the full matmul's), 1 to 5 captions per image in shuffled order. With
    `ties`, entries in {-1, 0, 1} and repeated image rows: many equal scores."""
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(5, 40))
    caption_image = np.repeat(np.arange(n_img), rng.integers(1, 6, n_img))
    rng.shuffle(caption_image)
    levels, scale = (1, 1) if ties else (1000, 1024)  # 8 products: |sum| < 2**23 / 2**20
    img, txt = (
        (rng.integers(-levels, levels + 1, (n, 8)) / scale).astype(np.float32)
        for n in (n_img, len(caption_image))
    )
    if ties:
        img[rng.integers(0, n_img, n_img // 2)] = img[0]
        txt[rng.integers(0, len(txt), len(txt) // 3)] = txt[0]
    return img, txt, caption_image


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_counting_matches_the_sorting_reference(seed: int, ties: bool, chunk_size: int | None):
    img, txt, caption_image = _split(seed, ties)
    sim = img @ txt.T
    ks = (1, 2, 5, 10)
    want = _sorted_metrics(sim, caption_image, ks)
    assert retrieval_metrics(img, txt, caption_image, ks, chunk_size) == want
    assert retrieval_metrics_from_scores(sim, caption_image, ks, chunk_size) == want
    # A transposed view (how re-ranking hands over t2i scores) and integer scores count the same.
    assert retrieval_metrics_from_scores(np.ascontiguousarray(sim.T).T, caption_image, ks) == want
    if ties:
        as_int = sim.astype(np.int64)  # integer scores already: entries in {-1, 0, 1}
        assert retrieval_metrics_from_scores(as_int, caption_image, ks, chunk_size) == want


@pytest.mark.slow
def test_memory_is_linear_in_the_split_size():
    # Before issue 16 this allocated the 20,000 x 100,000 matrix in float64 and argsorted it
    # (16 GB and more); now a 160-row chunk (64 MB) is the largest thing held.
    child = textwrap.dedent(
        """
        import numpy as np
        from model.metrics import retrieval_metrics
        rng = np.random.default_rng(0)
        img = rng.standard_normal((20_000, 64), dtype=np.float32)
        txt = rng.standard_normal((100_000, 64), dtype=np.float32)
        m = retrieval_metrics(img, txt, np.arange(100_000) % 20_000)
        assert 0 < m["t2i_median_rank"] <= 20_000, m
        # VmHWM: this process's own peak. ru_maxrss is not: Linux carries the parent's RSS at
        # fork into it across exec, so a big pytest process would inflate it.
        status = open("/proc/self/status").read()
        print(status.split("VmHWM:")[1].split()[0])  # KiB
        """
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    peak_kib = int(done.stdout.split()[-1])
    print(f"peak RSS {peak_kib / 1024:.0f} MiB in {time.perf_counter() - start:.1f} s")
    assert peak_kib < 1024 * 1024
