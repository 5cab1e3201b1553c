"""Tests of metric_jax.distances against loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from tests.helpers import np_pairwise, random_embeddings

METRICS = ("euclidean", "squared_euclidean", "cosine", "dot")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_matches_loops(metric, with_y):
  x = random_embeddings(0, 7, 5, scale=2.0)
  y = random_embeddings(1, 4, 5) if with_y else None
  got = mj.distances.pairwise(x, y, metric)
  want = np_pairwise(x, x if y is None else y, metric)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_euclidean_diagonal_is_exactly_zero_and_gradient_finite():
  x = jnp.asarray(random_embeddings(0, 6, 3, scale=100.0))
  d = mj.distances.pairwise(x)
  assert np.all(np.diag(d) == 0.0)
  grad = jax.grad(lambda e: mj.distances.pairwise(e).sum())(x)
  assert np.all(np.isfinite(grad))


def test_duplicate_points_have_zero_distance_and_zero_gradient():
  x = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
  y = jnp.array([[1.0, 2.0]])
  d = mj.distances.pairwise(x, y)
  assert float(d[0, 0]) == 0.0 and float(d[1, 0]) == 0.0
  g = jax.grad(lambda e: mj.distances.pairwise(e, y)[:2].sum())(x)
  np.testing.assert_array_equal(g[:2], 0.0)


def test_safe_sqrt_keeps_nan():
  assert np.isnan(mj.distances.safe_sqrt(jnp.array(jnp.nan)))
  assert float(jax.grad(mj.distances.safe_sqrt)(0.0)) == 0.0


def test_l2_normalize_zero_vector_and_dtype():
  x = jnp.array([[0.0, 0.0], [3.0, 4.0]], jnp.bfloat16)
  out = mj.distances.l2_normalize(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), [[0, 0], [0.6, 0.8]], atol=1e-2)
  g = jax.grad(lambda v: mj.distances.l2_normalize(v).sum())(jnp.zeros((1, 3)))
  assert np.all(np.isfinite(g))


def test_cosine_with_zero_vector_is_finite():
  x = jnp.array([[0.0, 0.0], [1.0, 0.0]])
  d = mj.distances.pairwise(x, metric="cosine")
  assert np.all(np.isfinite(d))
  g = jax.grad(lambda e: mj.distances.pairwise(e, metric="cosine").sum())(x)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_accumulates_in_float32(dtype):
  x = random_embeddings(3, 6, 8)
  got = mj.distances.pairwise(jnp.asarray(x, dtype))
  assert got.dtype == jnp.float32
  want = np_pairwise(np.asarray(jnp.asarray(x, dtype), np.float32), np.asarray(jnp.asarray(x, dtype), np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_is_similarity():
  assert not mj.distances.is_similarity("euclidean")
  assert not mj.distances.is_similarity("squared_euclidean")
  assert mj.distances.is_similarity("cosine")
  assert mj.distances.is_similarity("dot")
  assert not mj.distances.is_similarity(lambda x, y: x @ y.T)
  sim = mj.distances.custom(lambda x, y: x @ y.T, is_similarity=True)
  assert mj.distances.is_similarity(sim)


def test_custom_metric_is_used_and_shape_checked():
  fn = mj.distances.custom(lambda x, y: jnp.abs(x[:, None, 0] - y[None, :, 0]))
  x = jnp.array([[1.0, 5.0], [4.0, 0.0]])
  np.testing.assert_allclose(mj.distances.pairwise(x, metric=fn), [[0, 3], [3, 0]])
  with pytest.raises(ValueError, match="custom `metric` must return shape"):
    mj.distances.pairwise(x, metric=lambda a, b: jnp.zeros((3, 3)))


def test_bad_inputs_name_the_argument():
  x = jnp.ones((3, 2))
  with pytest.raises(ValueError, match="`x` must have rank 2"):
    mj.distances.pairwise(jnp.ones(3))
  with pytest.raises(TypeError, match="`x` must be a floating-point"):
    mj.distances.pairwise(jnp.ones((3, 2), jnp.int32))
  with pytest.raises(ValueError, match="same embedding size, got 2 and 3"):
    mj.distances.pairwise(x, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="`metric` must be one of"):
    mj.distances.pairwise(x, metric="manhattan")
  with pytest.raises(TypeError, match="`metric` must be one of"):
    mj.distances.pairwise(x, metric=3)


@pytest.mark.parametrize("n, m", [(16, 24), (7, 5)])   # a multiple of 8 and not
def test_matrix_product_derivatives_match_the_plain_product(n, m):
  # distances._dot has its own JVP rule (so that the reverse-mode product
  # keeps XLA:CPU's fast layout); every derivative must equal the plain one.
  x = jnp.asarray(random_embeddings(0, n, 6))
  y = jnp.asarray(random_embeddings(1, m, 6))
  weights = jnp.asarray(random_embeddings(2, n, m))
  plain = lambda a, b: jnp.sum(weights * jnp.sin(jnp.matmul(a, b.T)))
  ours = lambda a, b: jnp.sum(weights * jnp.sin(mj.distances.pairwise(a, b, "dot")))
  for derivative in (jax.grad, jax.jacfwd):
    got = derivative(ours, argnums=(0, 1))(x, y)
    want = derivative(plain, argnums=(0, 1))(x, y)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # Self-comparison: both tangents are x.
  self_w = weights[:, :n] if m >= n else jnp.ones((n, n))
  got = jax.grad(lambda a: jnp.sum(self_w * mj.distances.pairwise(a, None, "dot") ** 2))(x)
  want = jax.grad(lambda a: jnp.sum(self_w * jnp.matmul(a, a.T) ** 2))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  # Second order (forward over reverse).
  small_y = y[:, :2]
  hess = jax.hessian(lambda a: jnp.sum(mj.distances.pairwise(a, small_y, "dot") ** 2))(x[:3, :2])
  hess_want = jax.hessian(lambda a: jnp.sum(jnp.matmul(a, small_y.T) ** 2))(x[:3, :2])
  np.testing.assert_allclose(hess, hess_want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_symmetric_loss_path_equals_pairwise(metric):
  x = jnp.asarray(random_embeddings(3, 9, 4, scale=1.5))
  a = jnp.asarray(random_embeddings(4, 9, 9))
  sym_weights = a + a.T                        # a consumer that weighs (i, j) as (j, i)
  fast = mj.distances.self_pairwise_for_symmetric_loss(x, metric)
  slow = mj.distances.pairwise(x, None, metric)
  np.testing.assert_array_equal(fast, slow)

  def consumer(matrix_fn):
    return lambda e: jnp.sum(sym_weights * jnp.tanh(matrix_fn(e)))

  fast_fn = lambda e: mj.distances.self_pairwise_for_symmetric_loss(e, metric)
  slow_fn = lambda e: mj.distances.pairwise(e, None, metric)
  for derivative in (jax.grad, jax.jacfwd):
    np.testing.assert_allclose(derivative(consumer(fast_fn))(x), derivative(consumer(slow_fn))(x),
                               rtol=1e-5, atol=1e-5)
  # Second order: the gradient's own gradient (a Hessian-vector product).
  v = jnp.asarray(random_embeddings(5, 9, 4))
  hvp = lambda fn: jax.grad(lambda e: jnp.vdot(jax.grad(consumer(fn))(e), v))(x)
  np.testing.assert_allclose(hvp(fast_fn), hvp(slow_fn), rtol=1e-4, atol=1e-4)
  # The contract is real: an asymmetric consumer gets a different gradient.
  asym = lambda fn: jax.grad(lambda e: jnp.sum(a * fn(e)))(x)
  assert not np.allclose(asym(fast_fn), asym(slow_fn), atol=1e-3)


def test_symmetric_loss_path_rejects_bad_inputs():
  with pytest.raises(ValueError, match="`x` must have rank 2"):
    mj.distances.self_pairwise_for_symmetric_loss(jnp.ones(3))
  with pytest.raises((ValueError, TypeError), match="`metric` must be one of"):
    mj.distances.self_pairwise_for_symmetric_loss(jnp.ones((3, 2)), "manhattan")


@pytest.mark.parametrize("metric", METRICS + ("callable",))
def test_paired_is_the_diagonal_of_pairwise(metric):
  if metric == "callable":
    metric = mj.distances.custom(lambda a, b: jnp.abs(a[:, None] - b[None]).sum(-1), name="l1")
  x = random_embeddings(2, 6, 5, scale=2.0)
  y = random_embeddings(3, 6, 5)
  got = mj.distances.paired(x, y, metric)
  want = np.diag(np.asarray(mj.distances.pairwise(x, y, metric)))
  if isinstance(metric, str):
    np.testing.assert_allclose(want, [np_pairwise(x[k:k + 1], y[k:k + 1], metric)[0, 0]
                                      for k in range(6)], rtol=1e-5)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  w = jnp.asarray(np.linspace(-1.0, 2.0, 6, dtype=np.float32))
  grads = [jax.grad(lambda a, b: jnp.sum(w * f(a, b)), argnums=(0, 1))(x, y)
           for f in (lambda a, b: mj.distances.paired(a, b, metric),
                     lambda a, b: jnp.diag(mj.distances.pairwise(a, b, metric)))]
  for fast, slow in zip(*grads):
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-6)
  # Half precision in, float32 out; jit and vmap.
  half = mj.distances.paired(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), metric)
  assert half.dtype == jnp.float32 and np.all(np.isfinite(half))
  batched = jax.jit(jax.vmap(lambda a, b: mj.distances.paired(a, b, metric)))(
      jnp.stack([x, y]), jnp.stack([y, x]))
  np.testing.assert_allclose(batched[0], got, rtol=1e-6)


def test_paired_equal_rows_have_zero_gradient():
  x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  d, grad = jax.value_and_grad(lambda a: mj.distances.paired(a, x).sum())(x)
  assert float(d) < 1e-3 and np.all(np.asarray(grad) == 0.0)


def test_paired_rejects_bad_inputs():
  with pytest.raises(ValueError, match="same shape"):
    mj.distances.paired(jnp.ones((3, 2)), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="`y` must have rank 2"):
    mj.distances.paired(jnp.ones((3, 2)), jnp.ones(2))
  with pytest.raises((ValueError, TypeError), match="`metric` must be one of"):
    mj.distances.paired(jnp.ones((3, 2)), jnp.ones((3, 2)), "manhattan")
