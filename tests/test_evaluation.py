"""Tests of metric_jax.evaluation against slow NumPy references written from
the formulas (explicit loops over queries and ranks), scikit-learn and PML's
AccuracyCalculator."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metric_jax import distances
from metric_jax import evaluation as ev
from tests.helpers import HAS_PML, np_normalize, np_pairwise

HAS_FAISS = importlib.util.find_spec("faiss") is not None

ALL_KEYS_NO_CLUSTER = ["precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
                       "r_precision", "map_at_r", "mean_average_precision",
                       "mean_reciprocal_rank", "num_queries", "num_excluded_queries"]


# --------------------------------------------------------------------------
# NumPy references.
# --------------------------------------------------------------------------


def np_rankings(scores, is_sim, exclude_self):
  """Full ranking of every row: best first, ties by lower column (loops)."""
  scores = np.asarray(scores, np.float64)
  out = []
  for i in range(scores.shape[0]):
    cols = [j for j in range(scores.shape[1]) if not (exclude_self and j == i)]
    key = (lambda j: (-scores[i, j], j)) if is_sim else (lambda j: (scores[i, j], j))
    out.append(sorted(cols, key=key))
  return out


def np_metrics(rankings, ql, gl, k_values):
  """Per-query metric values from full rankings, straight from the formulas.

  Returns (dict of lists over valid queries, labels of the valid queries,
  number of excluded queries)."""
  res = {n: [] for n in ["precision_at_1"] + [f"recall_at_{k}" for k in k_values]
         + ["r_precision", "map_at_r", "mean_average_precision", "mean_reciprocal_rank"]}
  valid_labels, excluded = [], 0
  for i, order in enumerate(rankings):
    rel = [gl[j] == ql[i] for j in order]
    r = sum(rel)
    if r == 0:
      excluded += 1
      continue
    valid_labels.append(ql[i])
    res["precision_at_1"].append(float(rel[0]))
    for k in k_values:
      res[f"recall_at_{k}"].append(float(any(rel[:k])))
    res["r_precision"].append(sum(rel[:r]) / r)
    hits, map_r, ap = 0, 0.0, 0.0
    for pos, is_rel in enumerate(rel, start=1):
      if is_rel:
        hits += 1
        ap += hits / pos
        if pos <= r:
          map_r += hits / pos
    res["map_at_r"].append(map_r / r)
    res["mean_average_precision"].append(ap / r)
    res["mean_reciprocal_rank"].append(1.0 / (rel.index(True) + 1))
  return res, valid_labels, excluded


def np_reference(q, ql, g=None, gl=None, *, metric="euclidean", normalize=True,
                 k_values=(1, 2, 4, 8)):
  """Mean metrics from float64 scores (loops)."""
  exclude_self = g is None
  if g is None:
    g, gl = q, ql
  if normalize:
    q, g = np_normalize(q), np_normalize(g)
  scores = np_pairwise(q, g, metric)
  rankings = np_rankings(scores, metric in ("cosine", "dot"), exclude_self)
  res, _, excluded = np_metrics(rankings, list(ql), list(gl), k_values)
  out = {n: float(np.mean(v)) if v else float("nan") for n, v in res.items()}
  out["num_queries"] = float(len(ql) - excluded)
  out["num_excluded_queries"] = float(excluded)
  return out


def assert_metrics_close(got, want, rtol=1e-6, atol=1e-6):
  assert set(want) <= set(got), (sorted(got), sorted(want))
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol, err_msg=name)


def random_problem(seed, n=40, d=6, num_classes=7):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=n)
  centers = rng.normal(size=(num_classes, d))
  x = centers[labels] + 0.8 * rng.normal(size=(n, d))
  return x.astype(np.float32), labels


# --------------------------------------------------------------------------
# knn.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("metric,with_gallery", [("euclidean", False), ("euclidean", True),
                                                 ("squared_euclidean", True), ("cosine", False),
                                                 ("dot", True)])
def test_knn_matches_reference(metric, with_gallery):
  x, _ = random_problem(0, n=30)
  g, _ = random_problem(1, n=25)
  is_sim = metric in ("cosine", "dot")
  for gallery, excl in ((g, False),) if with_gallery else ((None, True),):
    ref_g = x if gallery is None else gallery
    scores = np_pairwise(x, ref_g, metric)
    want = np.array([r[:5] for r in np_rankings(scores, is_sim, excl)])
    idx, s = ev.knn(x, gallery, k=5, metric=metric, chunk_size=8)
    assert idx.dtype == jnp.int32 and s.dtype == jnp.float32 and idx.shape == (30, 5)
    np.testing.assert_array_equal(np.asarray(idx), want)
    np.testing.assert_allclose(np.asarray(s), np.take_along_axis(scores, want, 1),
                               rtol=1e-5, atol=1e-5)


def test_knn_ties_lower_index_first():
  # Integer coordinates: every distance is exact in float32, and many tie.
  x = np.array([[0, 0], [1, 0], [0, 1], [1, 0], [-1, 0], [0, -1], [0, 0], [2, 2], [1, 0]],
               np.float32)
  for metric, k, cs in (("euclidean", 3, 1), ("euclidean", 8, 4), ("dot", 5, 4),
                        ("squared_euclidean", 2, 9)):
    scores = np_pairwise(x, x, metric)
    want = np.array([r[:k] for r in np_rankings(scores, metric == "dot", True)])
    idx, _ = ev.knn(x, k=k, metric=metric, chunk_size=cs)
    np.testing.assert_array_equal(np.asarray(idx), want, err_msg=f"{metric} k={k} cs={cs}")
  # The cut falls inside a tie: six items (1, 2, 3, 4, 5, 8) are at distance 1 from x[0].
  idx, d = ev.knn(x[:1], x, k=3, exclude_self=True)
  assert idx.tolist() == [[6, 1, 2]] and d.tolist() == [[0.0, 1.0, 1.0]]


def test_block_top_k_exact_with_ties(monkeypatch):
  # The two-stage top-k (block maxima, then the best blocks' elements) against a sort.
  monkeypatch.setattr(ev, "_BLOCK", 8)
  top_k = jax.jit(ev._block_top_k, static_argnums=1)
  rng = np.random.default_rng(0)
  g = 8 * 9
  for trial, k in enumerate((1, 3, 8, 3)):
    key = (rng.integers(-3, 3, size=(5, g)) if trial % 2 else rng.normal(size=(5, g)))
    key = key.astype(np.float32)
    key[:, rng.integers(0, g)] = -np.inf
    vals, idx = top_k(jnp.asarray(key), k)
    want = np.array([sorted(range(g), key=lambda j: (-row[j], j))[:k] for row in key])
    np.testing.assert_array_equal(np.asarray(idx), want, err_msg=f"k={k}")
    np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(key, want, 1))


def test_knn_large_gallery_uses_blocks_and_matches_reference():
  # G = 600 is not a multiple of the block (128): the gallery is padded inside.
  rng = np.random.default_rng(0)
  g = rng.integers(-2, 3, size=(600, 3)).astype(np.float32)  # many exact ties
  q = g[:37]
  assert ev._use_blocks(600, 2)
  idx, s = ev.knn(q, g, k=2, metric="dot", chunk_size=16)
  scores = np_pairwise(q, g, "dot")
  want = np.array([r[:2] for r in np_rankings(scores, True, False)])
  np.testing.assert_array_equal(np.asarray(idx), want)
  np.testing.assert_array_equal(np.asarray(s), np.take_along_axis(scores, want, 1))
  idx, _ = ev.knn(g, k=2, metric="squared_euclidean", chunk_size=128)  # self excluded
  want = np.array([r[:2] for r in np_rankings(np_pairwise(g, g, "squared_euclidean"), False,
                                              True)])
  np.testing.assert_array_equal(np.asarray(idx), want)


def test_knn_signed_zero_ties():
  # dot products -0.0 and +0.0 are equal scores: lower index first.
  q = np.array([[-1.0]], np.float32)
  g = np.array([[0.0], [0.0], [-0.0], [0.0]], np.float32)
  for k in (1, 2, 3):
    idx, _ = ev.knn(q, g, k=k, metric="dot")
    assert idx.tolist() == [list(range(k))]


def test_knn_exclude_self_keeps_duplicates():
  x = np.array([[0., 0.], [0., 0.], [3., 0.], [0., 0.]], np.float32)
  idx, d = ev.knn(x, k=2)
  assert idx.tolist() == [[1, 3], [0, 3], [0, 1], [0, 1]]
  assert d[:, 0].tolist() == [0.0, 0.0, 3.0, 0.0]
  # With the same array as an explicit gallery, self is kept unless asked.
  idx, _ = ev.knn(x, x, k=1)
  assert idx[:, 0].tolist() == [0, 0, 2, 0]
  idx, _ = ev.knn(x[:2], x, k=1, exclude_self=True)  # query = prefix of the gallery
  assert idx[:, 0].tolist() == [1, 0]


def test_knn_chunk_size_invariance():
  x, _ = random_problem(3, n=23)
  ref_idx, ref_s = ev.knn(x, k=6, chunk_size=1024)
  for cs in (1, 7):  # 7 does not divide 23
    idx, s = ev.knn(x, k=6, chunk_size=cs)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx), err_msg=str(cs))
    np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), rtol=1e-6, atol=1e-6)


def test_knn_inside_jit():
  x, _ = random_problem(4, n=17)

  @jax.jit
  def outer(x):
    idx, s = ev.knn(x * 2.0, k=3, chunk_size=5)
    return idx, jnp.sum(s)

  idx, total = outer(x)
  e_idx, e_s = ev.knn(x * 2.0, k=3, chunk_size=5)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(e_idx))
  np.testing.assert_allclose(float(total), float(jnp.sum(e_s)), rtol=1e-6)


def test_knn_callable_metric_and_half_precision():
  x, _ = random_problem(5, n=12)
  manhattan = distances.custom(lambda a, b: jnp.sum(jnp.abs(a[:, None] - b[None]), -1),
                               name="l1")
  scores = np.abs(x[:, None].astype(np.float64) - x[None]).sum(-1)
  want = np.array([r[:3] for r in np_rankings(scores, False, True)])
  idx, s = ev.knn(x, k=3, metric=manhattan)
  np.testing.assert_array_equal(np.asarray(idx), want)
  # bf16 embeddings are upcast; the ranking is that of the bf16 values.
  xb = jnp.asarray(x, jnp.bfloat16)
  xf = np.asarray(xb.astype(jnp.float32))
  want = np.array([r[:3] for r in np_rankings(np_pairwise(xf, xf), False, True)])
  idx, s = ev.knn(xb, k=3)
  assert s.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(idx), want)


def test_knn_nan_traced_ranks_last():
  # Under jit the NaN check cannot raise: a NaN gallery row ranks last.
  x = jnp.array([[0.], [1.], [jnp.nan], [2.]])
  idx, _ = jax.jit(lambda x: ev.knn(x, k=3))(x)
  assert idx[0].tolist() == [1, 3, 2]


def test_knn_bad_input():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="`k`"):
    ev.knn(x, k=4)  # only 3 other items
  with pytest.raises(ValueError, match="`k`"):
    ev.knn(x, x[:2], k=3)
  with pytest.raises(ValueError, match="`gallery`"):
    ev.knn(x, np.zeros((0, 3), np.float32), k=1)
  with pytest.raises(ValueError, match="`query`"):
    ev.knn(np.zeros((0, 3), np.float32), x, k=1)
  with pytest.raises(ValueError, match="`query` and `gallery`"):
    ev.knn(x, np.zeros((4, 2), np.float32), k=1)
  with pytest.raises(TypeError, match="`query`"):
    ev.knn(np.zeros((4, 3), np.int32), k=1)
  with pytest.raises(ValueError, match="`metric`"):
    ev.knn(x, k=1, metric="manhattan")
  with pytest.raises(TypeError, match="`chunk_size`"):
    ev.knn(x, k=1, chunk_size=2.5)
  with pytest.raises(TypeError, match="`exclude_self` must be a bool or None, got str 'yes'"):
    ev.knn(x, x, k=1, exclude_self="yes")
  # A NumPy bool is a bool.
  np.testing.assert_array_equal(ev.knn(x, x, k=1, exclude_self=np.bool_(True))[0],
                                ev.knn(x, x, k=1, exclude_self=True)[0])
  bad = x.copy()
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match="`query` must be finite.*first: \\[2\\]"):
    ev.knn(bad, k=1)
  with pytest.raises(ValueError, match="`gallery` must be finite"):
    ev.knn(x, bad, k=1)
  with pytest.raises(ValueError, match="`exclude_self=True`"):
    ev.knn(x, x[:3], k=1, exclude_self=True)


# --------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------


def test_metrics_hand_made_ranking():
  # 1-D positions, Euclidean, no normalisation: rankings by hand.
  #   idx:    0    1    2    3    4    5    6
  x = np.array([[0.], [1.], [2.], [4.], [5.], [9.], [20.]], np.float32)
  y = np.array([0, 1, 0, 1, 0, 2, 3])  # classes 2 and 3 have one member: excluded
  out = ev.retrieval_metrics(x, y, k_values=(1, 2), normalize=False)
  # Full rankings (ties -> lower index), relevant items marked *:
  #   q0 (x=0, y=0): 1, 2*, 3, 4*, 5, 6   -> R=2, relevant at positions 2, 4
  #   q1 (x=1, y=1): 0, 2, 3*, 4, 5, 6    -> R=1, position 3 (0 and 2 tie at d=1)
  #   q2 (x=2, y=0): 1, 0*, 3, 4*, 5, 6   -> R=2, positions 2, 4 (0 and 3 tie at d=2)
  #   q3 (x=4, y=1): 4, 2, 1*, 0, 5, 6    -> R=1, position 3
  #   q4 (x=5, y=0): 3, 2*, 1, 5, 0*, 6   -> R=2, positions 2, 5 (1 and 5 tie at d=4)
  want_per_query = {
      "precision_at_1": [0, 0, 0, 0, 0],
      "recall_at_1": [0, 0, 0, 0, 0],
      "recall_at_2": [1, 0, 1, 0, 1],
      "r_precision": [1 / 2, 0, 1 / 2, 0, 1 / 2],
      "map_at_r": [(1 / 2) / 2, 0, (1 / 2) / 2, 0, (1 / 2) / 2],
      "mean_average_precision": [(1 / 2 + 2 / 4) / 2, 1 / 3, (1 / 2 + 2 / 4) / 2, 1 / 3,
                                 (1 / 2 + 2 / 5) / 2],
      "mean_reciprocal_rank": [1 / 2, 1 / 3, 1 / 2, 1 / 3, 1 / 2],
  }
  want = {k: float(np.mean(v)) for k, v in want_per_query.items()}
  want["num_queries"], want["num_excluded_queries"] = 5.0, 2.0
  assert_metrics_close(out, want)
  assert_metrics_close(out, np_reference(x, y, normalize=False, k_values=(1, 2)))


def test_metrics_ties_and_singletons_reference():
  # Integer grid with many exact ties and several singleton classes.
  rng = np.random.default_rng(7)
  x = rng.integers(-2, 3, size=(36, 3)).astype(np.float32)
  y = np.concatenate([rng.integers(0, 5, size=30), np.arange(10, 16)])
  for metric in ("euclidean", "dot"):
    out = ev.retrieval_metrics(x, y, metric=metric, normalize=False, chunk_size=7)
    assert_metrics_close(out, np_reference(x, y, metric=metric, normalize=False))
    assert out["num_excluded_queries"] == 6.0


@pytest.mark.parametrize("seed,metric", [(0, "euclidean"), (1, "cosine")])
def test_metrics_random_query_is_gallery(seed, metric):
  x, y = random_problem(seed, n=40)
  out = ev.retrieval_metrics(x, y, metric=metric, chunk_size=16)
  assert list(out) == ALL_KEYS_NO_CLUSTER
  assert_metrics_close(out, np_reference(x, y, metric=metric))


def test_metrics_random_separate_gallery():
  q, ql = random_problem(2, n=30, num_classes=6)
  g, gl = random_problem(3, n=41, num_classes=8)  # classes 6, 7 never queried
  ql[0] = 99  # a query class absent from the gallery: excluded
  out = ev.retrieval_metrics(q, ql, g, gl, k_values=(1, 3), chunk_size=9)
  assert_metrics_close(out, np_reference(q, ql, g, gl, k_values=(1, 3)))
  assert out["num_excluded_queries"] == 1.0
  out = ev.retrieval_metrics(q, ql, g, gl, metric="dot", normalize=False, k_values=(1, 3))
  assert_metrics_close(out, np_reference(q, ql, g, gl, metric="dot", normalize=False,
                                         k_values=(1, 3)))


def test_average_precision_matches_sklearn():
  from sklearn.metrics import average_precision_score
  x, y = random_problem(11, n=40)
  xn = np_normalize(x)
  s = -np_pairwise(xn, xn)
  aps = []
  for i in range(len(y)):
    mask = np.arange(len(y)) != i
    rel = (y[mask] == y[i])
    if rel.any():
      aps.append(average_precision_score(rel, s[i, mask]))
  out = ev.retrieval_metrics(x, y, chunk_size=16)
  np.testing.assert_allclose(out["mean_average_precision"], np.mean(aps), rtol=1e-6)


def test_knn_and_full_ranking_paths_agree():
  x, y = random_problem(5, n=40, num_classes=4)
  y[:3] = [20, 21, 22]
  full = ev.retrieval_metrics(x, y, chunk_size=16)  # full-ranking (counting) path
  knn_only = ev.retrieval_metrics(x, y, chunk_size=16, metrics=ev.KNN_METRICS)  # top-k path
  assert "mean_average_precision" not in knn_only
  for name, value in knn_only.items():
    assert full[name] == pytest.approx(value, rel=1e-7, abs=1e-7), name


def test_metrics_chunk_size_invariance():
  x, y = random_problem(6, n=40)
  base = ev.retrieval_metrics(x, y, chunk_size=16)  # 16 does not divide 40
  for cs in (1, 1000):
    assert ev.retrieval_metrics(x, y, chunk_size=cs) == pytest.approx(base, rel=1e-7, abs=1e-7)


def test_metric_subset_and_per_class():
  x, y = random_problem(8, n=40, num_classes=4)
  out = ev.retrieval_metrics(x, y, k_values=(2,), metrics=("recall_at_2", "map_at_r"),
                             per_class=True)
  ref_g = np_normalize(x)
  rankings = np_rankings(np_pairwise(ref_g, ref_g), False, True)
  res, labels, _ = np_metrics(rankings, list(y), list(y), (2,))
  labels = np.array(labels)
  for name in ("recall_at_2", "map_at_r"):
    vals = np.array(res[name])
    assert out[name] == pytest.approx(vals.mean(), rel=1e-6)
    for c in np.unique(labels):
      assert out[f"{name}/class_{c}"] == pytest.approx(vals[labels == c].mean(), rel=1e-6)
  assert "precision_at_1" not in out and "r_precision" not in out


def test_all_queries_excluded_gives_nan():
  x, _ = random_problem(9, n=6)
  out = ev.retrieval_metrics(x, np.arange(6), k_values=(1,))
  assert out["num_queries"] == 0.0 and out["num_excluded_queries"] == 6.0
  assert np.isnan(out["precision_at_1"]) and np.isnan(out["mean_average_precision"])


def test_labels_any_integer_dtype():
  x, y = random_problem(10, n=40)
  base = ev.retrieval_metrics(x, y, chunk_size=16)
  big = y.astype(np.int64) * 10_000_000_000 - 7
  assert ev.retrieval_metrics(x, big, chunk_size=16) == base
  assert ev.retrieval_metrics(jnp.asarray(x), jnp.asarray(y), chunk_size=16) == base


def test_retrieval_per_query_under_jit():
  x, y = random_problem(12, n=24, num_classes=5)
  max_r = int(np.bincount(y).max()) - 1

  @jax.jit
  def f(x, y):
    out = ev.retrieval_per_query(x, y, max_r=max_r, k_values=(1, 4), chunk_size=7)
    v = out["valid"]
    return {k: jnp.sum(jnp.where(v, a, 0)) / jnp.sum(v) for k, a in out.items()
            if k not in ("valid", "num_relevant")}

  got = {k: float(v) for k, v in f(jnp.asarray(x), jnp.asarray(y)).items()}
  want = ev.retrieval_metrics(x, y, k_values=(1, 4))
  for k, v in got.items():
    assert v == pytest.approx(want[k], rel=1e-6), k


def test_retrieval_metrics_bad_input():
  x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
  y = np.array([0, 0, 1, 1, 2, 2])
  with pytest.raises(ValueError, match="`query_labels` must have length 6"):
    ev.retrieval_metrics(x, y[:5])
  with pytest.raises(TypeError, match="`query_labels` must be an integer"):
    ev.retrieval_metrics(x, y.astype(np.float32))
  with pytest.raises(ValueError, match="`k_values`"):
    ev.retrieval_metrics(x, y, k_values=(1, 6))  # only 5 retrievable items
  with pytest.raises(ValueError, match="`k_values`"):
    ev.retrieval_metrics(x, y, k_values=())
  with pytest.raises(ValueError, match="`gallery`"):
    ev.retrieval_metrics(x, y, np.zeros((0, 3), np.float32), np.zeros((0,), np.int32))
  with pytest.raises(ValueError, match="`gallery` and `gallery_labels`"):
    ev.retrieval_metrics(x, y, x)
  with pytest.raises(ValueError, match="`gallery_labels` must have length 6"):
    ev.retrieval_metrics(x, y, x, y[:4])
  with pytest.raises(ValueError, match="`metrics`"):
    ev.retrieval_metrics(x, y, metrics=("nmi",))
  bad = x.copy()
  bad[4] = np.inf
  with pytest.raises(ValueError, match="`query` must be finite"):
    ev.retrieval_metrics(bad, y)
  with pytest.raises(ValueError, match="`embeddings`|`query`"):
    ev.evaluate(x[:, 0], y)
  with pytest.raises(TypeError, match="`query_labels` must be concrete"):
    jax.jit(lambda y: ev.retrieval_metrics(x, y))(y)


# --------------------------------------------------------------------------
# evaluate().
# --------------------------------------------------------------------------


def test_evaluate_keys_and_clustering():
  from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
  from metric_jax import clustering
  x, y = random_problem(13, n=40, num_classes=4)
  out = ev.evaluate(x, y)
  assert list(out) == ALL_KEYS_NO_CLUSTER[:-2] + ["num_queries", "num_excluded_queries",
                                                  "nmi", "ami"]
  assert all(isinstance(v, float) for v in out.values())
  assert_metrics_close(out, np_reference(x, y))
  # NMI / AMI are those of the k-means clustering of the normalised embeddings.
  res = clustering.kmeans(distances.l2_normalize(jnp.asarray(x)), 4, key=jax.random.key(0),
                          num_iters=20)
  pred = np.asarray(res.assignments)
  assert out["nmi"] == pytest.approx(normalized_mutual_info_score(y, pred), abs=1e-5)
  assert out["ami"] == pytest.approx(adjusted_mutual_info_score(y, pred), abs=1e-9)
  assert ev.evaluate(x, y) == out  # deterministic (default key)
  no_cluster = ev.evaluate(jnp.asarray(x), jnp.asarray(y), clustering=False)
  assert list(no_cluster) == ALL_KEYS_NO_CLUSTER


def test_evaluate_separate_gallery():
  q, ql = random_problem(14, n=20, num_classes=3)
  g, gl = random_problem(15, n=30, num_classes=3)
  out = ev.evaluate(q, ql, gallery=g, gallery_labels=gl, k_values=(1, 5), clustering=False)
  assert_metrics_close(out, np_reference(q, ql, g, gl, k_values=(1, 5)))


# --------------------------------------------------------------------------
# PML parity (AccuracyCalculator with faiss).
# --------------------------------------------------------------------------


@pytest.mark.skipif(not (HAS_PML and HAS_FAISS), reason="needs torch, PML and faiss")
def test_pml_accuracy_calculator_parity():
  import torch
  from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
  from metric_jax import clustering

  x, y = random_problem(21, n=120, d=8, num_classes=9)
  y[:2] = [50, 51]  # lone queries, excluded by both
  xn = np_normalize(x).astype(np.float32)  # PML's calculator does not normalise
  pred = np.random.default_rng(0).integers(0, 9, size=len(y))  # a fixed "clustering"
  calc = AccuracyCalculator(
      include=("precision_at_1", "r_precision", "mean_average_precision_at_r",
               "mean_average_precision", "mean_reciprocal_rank", "NMI", "AMI"),
      k=None, kmeans_func=lambda emb, n: torch.as_tensor(pred))
  pml = calc.get_accuracy(torch.as_tensor(xn), torch.as_tensor(y))
  ours = ev.retrieval_metrics(x, y)
  assert ours["precision_at_1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
  assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
  assert ours["map_at_r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
  assert ours["mean_average_precision"] == pytest.approx(pml["mean_average_precision"], abs=1e-6)
  assert ours["mean_reciprocal_rank"] == pytest.approx(pml["mean_reciprocal_rank"], abs=1e-6)
  assert float(clustering.nmi(y, pred)) == pytest.approx(pml["NMI"], abs=1e-5)
  assert clustering.ami(y, pred) == pytest.approx(pml["AMI"], abs=1e-9)

  # k="max_bin_count" (what MAP@R needs) and a separate reference set.
  g, gl = random_problem(22, n=90, d=8, num_classes=9)
  gn = np_normalize(g).astype(np.float32)
  calc = AccuracyCalculator(include=("precision_at_1", "r_precision",
                                     "mean_average_precision_at_r"), k="max_bin_count")
  pml = calc.get_accuracy(torch.as_tensor(xn), torch.as_tensor(y), torch.as_tensor(gn),
                          torch.as_tensor(gl))
  ours = ev.retrieval_metrics(x, y, g, gl, metrics=ev.KNN_METRICS)
  assert ours["precision_at_1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
  assert ours["r_precision"] == pytest.approx(pml["r_precision"], abs=1e-6)
  assert ours["map_at_r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)
