import numpy as np
import pytest

from hcdiag.errors import InputError
from hcdiag.validation import as_data_matrix, nonfinite_rows


def test_nonfinite_rows_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 7))
    idx = rng.choice(300, size=11, replace=False)
    x[idx, rng.integers(0, 7, size=11)] = rng.choice([np.nan, np.inf, -np.inf], size=11)
    naive = [i for i in range(300) if not all(np.isfinite(v) for v in x[i])]
    assert nonfinite_rows(x).tolist() == naive


def test_refuses_nonfinite_with_count_and_where():
    x = np.ones((10, 3))
    x[4, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(InputError, match=r"holds 2 row\(s\) with NaN or inf \(rows 4, 7\); clean them or pass drop_nonfinite=True"):
        as_data_matrix(x)


def test_drop_nonfinite_drops_exactly_those_rows():
    x = np.arange(30, dtype=float).reshape(10, 3)
    x[2, 2] = np.nan
    kept, dropped = as_data_matrix(x, drop_nonfinite=True)
    assert dropped.tolist() == [2]
    assert np.array_equal(kept, np.delete(x, 2, axis=0))


@pytest.mark.parametrize("bad,msg", [
    (np.ones(5), r"must be a 2-D array of shape \(n, N\); got 1-D"),
    (np.ones((1, 4)), r"has 1 row\(s\); at least 2 are needed"),
    (np.array([["a", "b"], ["c", "d"]]), r"must be numeric; got dtype <U1"),
])
def test_bad_shapes_and_types(bad, msg):
    with pytest.raises(InputError, match=msg):
        as_data_matrix(bad)
