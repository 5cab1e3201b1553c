"""Tests of label masks and reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj


def test_label_masks_self_and_where():
  labels = jnp.array([0, 0, 1, 1, 2])
  where = jnp.array([True, True, True, False, True])
  m = mj.pairs.label_masks(labels, where=where)
  pos = np.zeros((5, 5), bool)
  neg = np.zeros((5, 5), bool)
  for i in range(5):
    for j in range(5):
      if not (where[i] and where[j]):
        continue
      if labels[i] == labels[j] and i != j:
        pos[i, j] = True
      if labels[i] != labels[j]:
        neg[i, j] = True
  np.testing.assert_array_equal(m.pos, pos)
  np.testing.assert_array_equal(m.neg, neg)


def test_label_masks_with_reference_keeps_diagonal():
  labels = jnp.array([0, 1])
  m = mj.pairs.label_masks(labels, jnp.array([0, 1]))
  np.testing.assert_array_equal(m.pos, np.eye(2, dtype=bool))
  m = mj.pairs.label_masks(labels, jnp.array([0, 1]), exclude_self=True)
  assert not np.any(m.pos)
  with pytest.raises(ValueError, match="exclude_self"):
    mj.pairs.label_masks(labels, jnp.array([0, 1, 1]), exclude_self=True)


def test_prepare_validates_inputs():
  emb = jnp.ones((4, 3))
  lab = jnp.zeros(4, jnp.int32)
  with pytest.raises(TypeError, match="`labels` must be an integer array, got dtype float32"):
    mj.pairs.prepare(emb, jnp.zeros(4))
  with pytest.raises(ValueError, match="`labels` must have length 4"):
    mj.pairs.prepare(emb, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="`ref_embeddings` and `ref_labels` must be given together"):
    mj.pairs.prepare(emb, lab, ref_embeddings=emb)
  with pytest.raises(ValueError, match="`ref_labels` must have length 2"):
    mj.pairs.prepare(emb, lab, jnp.ones((2, 3)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="`where` must have shape"):
    mj.pairs.prepare(emb, lab, where=jnp.ones(3, bool))
  with pytest.raises(TypeError, match="`where` must be a boolean mask"):
    mj.pairs.prepare(emb, lab, where=jnp.ones(4))
  with pytest.raises(ValueError, match="`pair_mask` must have shape"):
    mj.pairs.prepare(emb, lab, pair_mask=jnp.ones((4, 3), bool))


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum", "none"])
def test_reduce_matches_loops(reduction):
  terms = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]], np.float32)
  mask = np.array([[True, True, False], [True, True, True]])
  got = mj.reductions.reduce(jnp.asarray(terms), jnp.asarray(mask), reduction)
  vals = [terms[i, j] for i in range(2) for j in range(3) if mask[i, j]]
  if reduction == "mean":
    want = sum(vals) / len(vals)
  elif reduction == "mean_nonzero":
    want = sum(vals) / len([v for v in vals if v > 0])
  elif reduction == "sum":
    want = sum(vals)
  else:
    want = np.where(mask, terms, 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_reduce_empty_is_zero_with_zero_gradient(reduction):
  terms = jnp.array([1.0, 2.0])
  val, grad = jax.value_and_grad(
      lambda t: mj.reductions.reduce(t, jnp.zeros(2, bool), reduction))(terms)
  assert float(val) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_reduce_rejects_unknown():
  with pytest.raises(ValueError, match="`reduction` must be one of"):
    mj.reductions.reduce(jnp.ones(2), None, "avg")


def test_masked_logsumexp_matches_loop_and_empty_rows():
  x = np.array([[1.0, 2.0, 300.0], [-5.0, 0.0, 1.0], [7.0, 8.0, 9.0]], np.float32)
  mask = np.array([[True, True, False], [True, False, True], [False, False, False]])
  lse, nonempty = mj.reductions.masked_logsumexp(jnp.asarray(x), jnp.asarray(mask))
  for i in range(2):
    vals = [x[i, j] for j in range(3) if mask[i, j]]
    np.testing.assert_allclose(lse[i], np.log(np.sum(np.exp(np.array(vals, np.float64)))), rtol=1e-6)
  assert float(lse[2]) == 0.0 and not bool(nonempty[2])
  lse0, _ = mj.reductions.masked_logsumexp(jnp.asarray(x), jnp.asarray(mask), include_zero=True)
  for i in range(3):
    vals = [0.0] + [x[i, j] for j in range(3) if mask[i, j]]
    np.testing.assert_allclose(lse0[i], np.log(np.sum(np.exp(np.array(vals, np.float64)))), rtol=1e-6)
  g = jax.grad(lambda v: mj.reductions.masked_logsumexp(v, jnp.asarray(mask))[0].sum())(jnp.asarray(x))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~mask] == 0)


def test_masked_max_min():
  x = jnp.array([[1.0, 5.0, -2.0], [0.0, 0.0, 0.0]])
  mask = jnp.array([[True, False, True], [False, False, False]])
  mx, has = mj.reductions.masked_max(x, mask)
  mn, _ = mj.reductions.masked_min(x, mask)
  np.testing.assert_allclose(mx, [1.0, 0.0])
  np.testing.assert_allclose(mn, [-2.0, 0.0])
  np.testing.assert_array_equal(has, [True, False])


def test_per_anchor_mean():
  terms = jnp.array([[1.0, 3.0], [2.0, 4.0]])
  mask = jnp.array([[True, True], [False, False]])
  means, has = mj.reductions.per_anchor_mean(terms, mask)
  np.testing.assert_allclose(means, [2.0, 0.0])
  np.testing.assert_array_equal(has, [True, False])


def _argmax_cases():
  rng = np.random.default_rng(3)
  ties = rng.integers(0, 3, size=(7, 9)).astype(np.float32)     # many tied maxima
  special = ties.copy()
  special[1, [2, 5]] = np.nan                                   # NaN wins, the first one
  special[2] = -np.inf                                          # all -inf: index 0
  special[3] = np.inf
  special[4, 4:] = np.inf
  special[5] = 0.0
  return {"ties": ties, "special": special,
          "bool": rng.random((6, 10)) < 0.3,
          "3d": rng.integers(0, 4, size=(3, 5, 6)).astype(np.float32)}


@pytest.mark.parametrize("case", sorted(_argmax_cases()))
def test_first_argmax_and_argmin_are_numpy_argmax(case):
  x = _argmax_cases()[case]
  for axis in range(-x.ndim, x.ndim):
    for fast, slow in ((mj.reductions.first_argmax, jnp.argmax),
                       (mj.reductions.first_argmin, jnp.argmin)):
      got = jax.jit(fast, static_argnums=1)(jnp.asarray(x), axis)
      want = slow(jnp.asarray(x).astype(jnp.float32), axis=axis)
      assert got.dtype == jnp.int32
      np.testing.assert_array_equal(got, want, err_msg=f"{fast.__name__} axis={axis}")
  batched = jax.vmap(lambda r: mj.reductions.first_argmax(r, axis=-1))(jnp.asarray(x))
  np.testing.assert_array_equal(batched, jnp.argmax(jnp.asarray(x).astype(jnp.float32), -1))
