import json
import math

import numpy as np
import pytest

from earmark.metrics import AccuracyMatrix, format_table

SUMMARY_KEYS = [
    "average_incremental_accuracy", "last_accuracy", "performance_drop", "forgetting",
    "backward_transfer", "base_accuracy", "novel_accuracy", "harmonic_mean",
]


@pytest.fixture
def three():
    """Groups of 10, 4 and 6 test items; hand-chosen correct counts.

    A = [[0.8,  -,    -  ],
         [0.9,  0.75, -  ],
         [0.5,  0.25, 0.5]]
    """
    correct = [[8, 0, 0], [9, 3, 0], [5, 1, 3]]
    counts = [[10, 0, 0], [10, 4, 0], [10, 4, 6]]
    return AccuracyMatrix(np.array(correct), np.array(counts))


def from_accuracies(A, n=10):
    """A matrix with n test items per group and the given (lower-triangular) accuracies."""
    T = len(A)
    counts = np.tril(np.full((T, T), n))
    correct = np.zeros((T, T), dtype=int)
    for i in range(T):
        for j in range(i + 1):
            correct[i, j] = round(A[i][j] * n)
    return AccuracyMatrix(correct, counts)


def test_matrix_by_hand(three):
    A = three.matrix
    expected = np.array([[0.8, np.nan, np.nan], [0.9, 0.75, np.nan], [0.5, 0.25, 0.5]])
    np.testing.assert_allclose(A, expected)
    assert np.isnan(A[0, 1]) and np.isnan(A[0, 2]) and np.isnan(A[1, 2])


def test_seen_accuracy_is_item_weighted(three):
    seen = three.seen_accuracy()
    np.testing.assert_allclose(seen, [8 / 10, 12 / 14, 9 / 20])
    # an unweighted mean over groups would give 0.825 and 0.41667 instead
    assert not math.isclose(seen[1], (0.9 + 0.75) / 2)
    assert not math.isclose(seen[2], (0.5 + 0.25 + 0.5) / 3)


def test_scalar_metrics_by_hand(three):
    assert three.average_incremental_accuracy() == pytest.approx((0.8 + 12 / 14 + 0.45) / 3)
    assert three.last_accuracy() == pytest.approx(0.45)
    assert three.performance_drop() == pytest.approx(0.35)
    # group 0: best of A[0,0]=0.8, A[1,0]=0.9 -> 0.9 - 0.5; group 1: 0.75 - 0.25; group 2 left out
    assert three.forgetting() == pytest.approx((0.4 + 0.5) / 2)
    # (A[2,0] - A[0,0] + A[2,1] - A[1,1]) / 2
    assert three.backward_transfer() == pytest.approx((-0.3 - 0.5) / 2)
    assert three.base_accuracy() == pytest.approx(0.5)
    # novel after session 2 pools groups 1 and 2 by items: 4 / 10 (a group mean would be 0.375)
    assert three.novel_accuracy() == pytest.approx(0.4)
    assert three.harmonic_mean() == pytest.approx(2 * 0.5 * 0.4 / 0.9)


def test_base_novel_at_earlier_sessions(three):
    assert three.base_accuracy(0) == pytest.approx(0.8)
    assert three.base_accuracy(1) == pytest.approx(0.9)
    assert three.novel_accuracy(1) == pytest.approx(0.75)
    assert three.harmonic_mean(1) == pytest.approx(2 * 0.9 * 0.75 / 1.65)
    assert math.isnan(three.novel_accuracy(0)) and math.isnan(three.harmonic_mean(0))
    assert three.base_accuracy(-2) == three.base_accuracy(1)
    with pytest.raises(IndexError):
        three.base_accuracy(3)


def test_summary_names_and_values(three):
    s = three.summary()
    assert list(s) == SUMMARY_KEYS
    assert s["forgetting"] == three.forgetting()
    assert s["average_incremental_accuracy"] == three.average_incremental_accuracy()
    assert s["harmonic_mean"] == three.harmonic_mean()
    assert all(isinstance(v, float) for v in s.values())


def test_forgetting_best_at_learning_session_and_last_group_excluded():
    """Each group's best accuracy is at the session it was learned; the last group has nothing to forget.

    Counting the last group (0 forgetting) would give 0.5; skipping i == j would give 0 for group 0.
    """
    m = from_accuracies([[1.0], [0.5, 1.0], [0.5, 0.0, 0.0]])
    assert m.forgetting() == pytest.approx((0.5 + 1.0) / 2)


def test_forgetting_max_excludes_final_and_includes_learning_session():
    """Group 1 improves at the end: its forgetting is negative, not 0.

    Correct: group 0: 0.9 - 0.7 = 0.2, group 1: 0.4 - 0.8 = -0.4 -> -0.1.
    max including the final session -> (0.2 + 0) / 2 = 0.1; max excluding session j -> group 0 would be
    0.6 - 0.7 and group 1 undefined; counting group 2 -> -0.0667.
    """
    m = from_accuracies([[0.9], [0.6, 0.4], [0.7, 0.8, 0.1]])
    assert m.forgetting() == pytest.approx(-0.1)
    assert m.backward_transfer() == pytest.approx(((0.7 - 0.9) + (0.8 - 0.4)) / 2)


def test_forgetting_four_sessions():
    A = [[0.6], [0.8, 0.9], [0.7, 0.5, 1.0], [0.4, 0.6, 0.3, 0.2]]
    m = from_accuracies(A)
    # group 0: max(0.6, 0.8, 0.7) - 0.4; group 1: max(0.9, 0.5) - 0.6; group 2: 1.0 - 0.3
    assert m.forgetting() == pytest.approx((0.4 + 0.3 + 0.7) / 3)
    assert m.backward_transfer() == pytest.approx(((0.4 - 0.6) + (0.6 - 0.9) + (0.3 - 1.0)) / 3)


def test_single_session():
    m = AccuracyMatrix(np.array([[7]]), np.array([[10]]))
    assert m.average_incremental_accuracy() == pytest.approx(0.7)
    assert m.last_accuracy() == pytest.approx(0.7)
    assert m.performance_drop() == 0.0
    assert math.isnan(m.forgetting())
    assert math.isnan(m.backward_transfer())
    assert m.base_accuracy() == pytest.approx(0.7)
    assert math.isnan(m.novel_accuracy()) and math.isnan(m.harmonic_mean())


def test_harmonic_mean_zero_when_both_zero():
    m = from_accuracies([[0.0], [0.0, 0.0]])
    assert m.harmonic_mean() == 0.0
    assert from_accuracies([[1.0], [0.0, 1.0]]).harmonic_mean() == 0.0


def test_from_predictions_matches_hand_counts():
    session_classes = [np.array([0, 1]), np.array([2]), np.array([3, 4])]
    y_true = [
        np.array([0, 0, 1, 1]),
        np.array([0, 1, 1, 2, 2, 2]),
        np.array([0, 1, 2, 3, 3, 4]),
    ]
    y_pred = [
        np.array([0, 4, 1, 0]),  # 4 is not seen yet: wrong, as any other mistake
        np.array([0, 2, 1, 2, 0, 2]),
        np.array([3, 1, 2, 3, 4, 4]),
    ]
    m = AccuracyMatrix.from_predictions(y_true, y_pred, session_classes)
    np.testing.assert_array_equal(m.correct, [[2, 0, 0], [2, 2, 0], [1, 1, 2]])
    np.testing.assert_array_equal(m.counts, [[4, 0, 0], [3, 3, 0], [2, 1, 3]])
    inc = AccuracyMatrix.empty(3)
    for i in range(3):
        inc.record(i, y_true[i], y_pred[i], session_classes)
    np.testing.assert_array_equal(inc.correct, m.correct)
    np.testing.assert_array_equal(inc.counts, m.counts)


def test_record_rejects_bad_input():
    sc = [np.array([0, 1]), np.array([2])]
    m = AccuracyMatrix.empty(2)
    with pytest.raises(ValueError, match="later groups"):
        m.record(0, np.array([0, 2]), np.array([0, 2]), sc)
    with pytest.raises(ValueError, match="no session group"):
        m.record(1, np.array([0, 7]), np.array([0, 7]), sc)
    with pytest.raises(ValueError, match="3 true labels but 2 predictions"):
        m.record(1, np.array([0, 1, 2]), np.array([0, 1]), sc)
    with pytest.raises(ValueError, match="session class groups"):
        m.record(0, np.array([0]), np.array([0]), sc[:1])


def test_constructor_validates():
    with pytest.raises(ValueError, match="above the diagonal"):
        AccuracyMatrix(np.zeros((2, 2), int), np.array([[1, 1], [1, 1]]))
    with pytest.raises(ValueError, match="correct <= counts"):
        AccuracyMatrix(np.array([[2]]), np.array([[1]]))
    with pytest.raises(ValueError, match="same"):
        AccuracyMatrix(np.zeros((2, 2), int), np.zeros((2, 3), int))


def test_dict_round_trip(three):
    d = json.loads(json.dumps(three.to_dict()))
    assert d["correct"] == [[8, 0, 0], [9, 3, 0], [5, 1, 3]]
    back = AccuracyMatrix.from_dict(d)
    np.testing.assert_array_equal(back.correct, three.correct)
    np.testing.assert_array_equal(back.counts, three.counts)
    assert back.summary() == three.summary()


def test_format_table_aligns_columns():
    rows = [{"learner": "ncm", "AA": "81.2", "n": 5}, {"learner": "analytic", "AA": float("nan")}]
    out = format_table(rows, ["learner", "AA", "n"])
    lines = out.splitlines()
    assert lines[0].split() == ["learner", "AA", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2] == "ncm       81.2  5"
    assert lines[3] == "analytic     -  -"
    assert len({len(line) for line in lines}) == 1
    assert format_table([{"x": 0.12345}], ["x"]).splitlines()[2] == "0.123"
