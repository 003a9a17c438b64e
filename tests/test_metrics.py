import numpy as np
import pytest
from sklearn import metrics as skm

from deepcluster.metrics import ari, cluster_purity, contingency, hungarian_accuracy, nmi


def test_nmi_hand_computation():
    # A = [0,0,1,1], B = [0,0,0,1]: I = H(B) - H(B|A) computed by hand.
    a, b = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    ha = np.log(2)
    hb = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    h_b_given_a = 0.5 * (-(0.5 * np.log(0.5) * 2))  # only cluster a=1 is mixed
    expected = (hb - h_b_given_a) / np.sqrt(ha * hb)
    assert nmi(a, b) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_nmi_and_ari_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 7, 500)
    b = np.where(rng.random(500) < 0.6, a, rng.integers(0, 11, 500))
    assert nmi(a, b) == pytest.approx(skm.normalized_mutual_info_score(a, b, average_method="geometric"), abs=1e-10)
    assert ari(a, b) == pytest.approx(skm.adjusted_rand_score(a, b), abs=1e-10)


def test_nmi_edge_cases():
    x = np.array([3, 3, 5, 5, 9])
    assert nmi(x, x) == pytest.approx(1.0)
    assert nmi(np.zeros(5), np.zeros(5)) == 1.0
    assert nmi(np.zeros(5), x) == 0.0
    with pytest.raises(ValueError, match="length"):
        nmi(np.zeros(3), np.zeros(4))


def test_hungarian_accuracy_of_permuted_labels_is_one():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 10, 1000)
    perm = rng.permutation(10)
    assert hungarian_accuracy(perm[truth], truth) == 1.0


def test_hungarian_accuracy_reference():
    truth = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([1, 1, 0, 0, 0, 0])  # best matching: 1->0 (2), 0->1 (3) => 5/6
    assert hungarian_accuracy(pred, truth) == pytest.approx(5 / 6)
    assert contingency(pred, truth).tolist() == [[1, 3], [2, 0]]
    assert cluster_purity(pred, truth).tolist() == [0.75, 1.0]
