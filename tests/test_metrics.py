import numpy as np
import pytest

from model.metrics import retrieval_metrics


def test_perfect_similarity_gives_recall_one():
    # 3 images, 2 captions each; captions 2i, 2i+1 describe image i.
    cap_img = np.array([0, 0, 1, 1, 2, 2])
    sim = (np.arange(3)[:, None] == cap_img[None, :]).astype(float)
    m = retrieval_metrics(sim, cap_img, ks=(1, 5))
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
    m = retrieval_metrics(sim, cap_img, ks=(1, 2))
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
    m = retrieval_metrics(sim, cap_img, ks=(1,))
    assert m["i2t_R1"] == 1.0
    # Caption 0 ranks image 1 above image 0: t2i R@1 = 2/3.
    assert m["t2i_R1"] == pytest.approx(2 / 3)


def test_rejects_mismatched_shapes_and_uncaptioned_images():
    with pytest.raises(ValueError, match="N_cap"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]))


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
    by_text, by_image = retrieval_examples(sim, cap_img, queries=2, k=2)
    # Caption queries 0 and 5 (evenly spaced); caption 5's own image 2 ranks last, outside k.
    assert by_text == [(0, [(0, True), (1, False)]), (5, [(1, False), (0, False)])]
    # Image queries 0 and 2; each one's second caption is image 1's.
    assert by_image == [(0, [(0, True), (2, False)]), (2, [(4, True), (2, False)])]
    # k larger than the split is cut to it.
    assert len(retrieval_examples(sim, cap_img, queries=1, k=10)[0][0][1]) == 3
