"""Streaming losses equal the dense ones (values and gradients), for every
label layout, with and without a reference set, with padding (``where``),
and for tile sizes that do / do not divide the number of references.

The dense losses are checked against NumPy loop references in
tests/losses/; here every streaming loss is checked against its dense
twin, plus the generic contract (jit, vmap, numerical gradients, degenerate
batches, half precision), bounded memory, and the extra arguments
(``tile_size``, ``ids``, ``max_positives``).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metric_jax as mj
from metric_jax import streaming as st
from tests.helpers import check_loss_contract, label_layouts, random_embeddings

L = mj.losses
B, M, D = 12, 10, 5

# name -> (streaming loss, dense loss, kwargs for both, modes). Modes: "self"
# compares the batch with itself, "ref" uses a reference set (kept to the
# cases where it takes another code path, to bound compile time).
# Hyper-parameters are scaled to the test data (distances ~ 3) so that every
# loss is active.
SELF, BOTH, REF = ("self",), ("self", "ref"), ("ref",)
CASES = {
    "contrastive": (st.streaming_contrastive_loss, L.contrastive_loss, {"neg_margin": 3.0},
                    BOTH),
    "contrastive_cosine_squared": (
        st.streaming_contrastive_loss, L.contrastive_loss,
        {"distance": "cosine", "pos_margin": 0.9, "neg_margin": 0.1, "squared": True,
         "reduction": "mean"}, SELF),
    "triplet_hard": (st.streaming_triplet_margin_loss, L.triplet_margin_loss,
                     {"mining": "hard", "margin": 1.0}, SELF),
    "triplet_easy_swap_soft": (st.streaming_triplet_margin_loss, L.triplet_margin_loss,
                               {"mining": "easy", "swap": True, "soft": True,
                                "reduction": "sum"}, SELF),
    "triplet_all": (st.streaming_triplet_margin_loss, L.triplet_margin_loss,
                    {"mining": "all", "margin": 1.0, "max_positives": 12}, SELF),
    "triplet_all_swap_soft_cosine": (
        st.streaming_triplet_margin_loss, L.triplet_margin_loss,
        {"mining": "all", "swap": True, "soft": True, "distance": "cosine",
         "max_positives": 12, "reduction": "mean"}, SELF),
    "triplet_semihard": (st.streaming_triplet_margin_loss, L.triplet_margin_loss,
                         {"mining": "semihard", "margin": 1.0, "max_positives": 12}, SELF),
    "triplet_semihard_hardest": (st.streaming_triplet_margin_loss, L.triplet_margin_loss,
                                 {"mining": "semihard", "band_select": "hardest",
                                  "margin": 1.0, "max_positives": 12}, SELF),
    "triplet_semihard_tf": (st.streaming_triplet_margin_loss, L.triplet_margin_loss,
                            {"mining": "semihard", "semihard": "tf", "margin": 1.0,
                             "max_positives": 12, "reduction": "mean"}, SELF),
    # With a reference set (ref mode) the reference's own negatives: the
    # ref-to-ref stream.
    "lifted": (st.streaming_lifted_structure_loss, L.lifted_structure_loss, {}, BOTH),
    "lifted_anchor_only": (st.streaming_lifted_structure_loss, L.lifted_structure_loss,
                           {"ref_negatives": "anchor_only", "reduction": "sum"}, REF),
    "lifted_pml": (st.streaming_lifted_structure_loss, L.lifted_structure_loss,
                   {"empty_lse": "zero", "ref_negatives": "pml", "distance": "cosine",
                    "reduction": "mean_nonzero"}, REF),
    "generalized_lifted": (st.streaming_generalized_lifted_structure_loss,
                           L.generalized_lifted_structure_loss, {}, SELF),
    "generalized_lifted_zero": (st.streaming_generalized_lifted_structure_loss,
                                L.generalized_lifted_structure_loss,
                                {"empty_lse": "zero", "reduction": "none"}, SELF),
    "multi_similarity": (st.streaming_multi_similarity_loss, L.multi_similarity_loss,
                         {"beta": 10.0}, BOTH),
    "multi_similarity_euclidean": (st.streaming_multi_similarity_loss,
                                   L.multi_similarity_loss,
                                   {"distance": "euclidean", "base": 2.0, "alpha": 1.0,
                                    "beta": 3.0, "reduction": "sum"}, SELF),
    "circle": (st.streaming_circle_loss, L.circle_loss, {"gamma": 16.0, "reduction": "none"},
               SELF),
    "ntxent": (st.streaming_ntxent_loss, L.ntxent_loss, {"temperature": 0.5}, BOTH),
    "ntxent_euclidean": (st.streaming_ntxent_loss, L.ntxent_loss,
                         {"temperature": 2.0, "distance": "euclidean",
                          "reduction": "mean_nonzero"}, SELF),
    "supcon": (st.streaming_supcon_loss, L.supcon_loss, {"temperature": 0.5}, SELF),
    "nca": (st.streaming_nca_loss, L.nca_loss, {"softmax_scale": 0.5}, BOTH),
    "ranked_list": (st.streaming_ranked_list_loss, L.ranked_list_loss,
                    {"alpha": 3.0, "margin": 1.0, "Tp": 2.0}, BOTH),
    "ranked_list_pml_none": (st.streaming_ranked_list_loss, L.ranked_list_loss,
                             {"alpha": 3.0, "margin": 1.0, "pml_compat": True,
                              "reduction": "none"}, SELF),
    "nca_cosine_none": (st.streaming_nca_loss, L.nca_loss,
                        {"distance": "cosine", "softmax_scale": 4.0, "reduction": "none"}, SELF),
    "npair": (st.streaming_npair_loss, L.npair_loss, {}, SELF),
    "npair_all_cosine": (st.streaming_npair_loss, L.npair_loss,
                         {"pairs_per_class": "all", "distance": "cosine", "l2_reg": 0.0,
                          "reduction": "none"}, REF),
}


def _tile(name: str, salt: int, n: int) -> int:
  """A pseudo-random tile size in [1, n + 2] that differs across cases."""
  return 1 + zlib.crc32(f"{name}/{salt}".encode()) % (n + 2)


def test_tiles_cover_divisors_and_non_divisors():
  tiles_b = {_tile(n, 0, B) for n, c in CASES.items() if "self" in c[3]}
  tiles_m = {_tile(n, 5, M) for n, c in CASES.items() if "ref" in c[3]}
  assert any(B % t for t in tiles_b) and any(B % t == 0 for t in tiles_b)
  assert any(t >= B for t in tiles_b)        # one tile: residuals kept, no recompute
  assert any(M % t for t in tiles_m) and any(t > M for t in tiles_m)


def _inputs():
  x = random_embeddings(0, B, D)
  ref = random_embeddings(1, M, D)
  ref_labels = np.array([0, 1, 1, 2, 3, 3, 3, 5, 9, 0], np.int32)
  return x, ref, ref_labels


def _check_close(got, want, what):
  (vs, aux_s), gs = got if isinstance(got[0], tuple) else ((got[0], None), got[1])
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(gs)
             if not np.isnan(float(vs))), f"{what}: non-finite gradient"
  (vd, aux_d), gd = want if isinstance(want[0], tuple) else ((want[0], None), want[1])
  if aux_d is not None:
    np.testing.assert_allclose(np.asarray(aux_s), np.asarray(aux_d), rtol=2e-5, atol=1e-6,
                               err_msg=what)
  if np.isnan(float(vd)):
    assert np.isnan(float(vs)), f"{what}: dense is NaN, streaming {vs}"
    return
  np.testing.assert_allclose(float(vs), float(vd), rtol=2e-5, atol=1e-6, err_msg=what)
  for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gd)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6,
                               err_msg=what)


def _runner(fn, kw, modes, tiles):
  """One jitted function per loss computing every mode's value and
  gradients (one compilation per case)."""
  ref_where = np.arange(M) != 4
  t_self, t_ref = ({"tile_size": t} for t in tiles) if tiles else ({}, {})

  def loss(*args, **kwargs):
    out = fn(*args, **kwargs)
    # reduction="none": the [B] per-anchor terms (compared as aux) and the
    # gradient of their sum.
    return jnp.sum(out), out

  def run(x, labels, where, ref, ref_labels):
    out = {}
    if "self" in modes:
      out["self"] = jax.value_and_grad(
          lambda e: loss(e, labels, where=where, **t_self, **kw), has_aux=True)(x)
    if "ref" in modes:
      out["ref"] = jax.value_and_grad(
          lambda e, r: loss(e, labels, r, ref_labels, where=where, ref_where=ref_where,
                            **t_ref, **kw), argnums=(0, 1), has_aux=True)(x, ref)
    return out

  return jax.jit(run)


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_equals_dense(name):
  """Self mode: loss(x, labels, where), grad wrt x; ref mode: grads wrt the
  anchors and the references (with padded references). Every label layout,
  with and without padded anchors (NaN in the padding)."""
  s_fn, d_fn, kw, modes = CASES[name]
  tiles = (_tile(name, 0, B), _tile(name, 5, M))
  fs = _runner(s_fn, kw, modes, tiles)
  fd = _runner(d_fn, kw, modes, None)
  x, ref, ref_labels = _inputs()
  all_valid = np.ones(B, bool)
  padded = np.arange(B) < B - 3
  x_nan_pad = x.copy()
  x_nan_pad[B - 3:] = np.nan
  x_dup = x.copy()
  x_dup[[1, 2, 7]] = x[0]         # coincident points: zero distances, finite gradients
  for lay, labels in label_layouts(B).items():
    for emb, where, what in ((x, all_valid, "plain"), (x_nan_pad, padded, "where"),
                             (x_dup, all_valid, "duplicates")):
      got = fs(emb, labels, where, ref, ref_labels)
      want = fd(emb, labels, where, ref, ref_labels)
      for mode in modes:
        _check_close(got[mode], want[mode], f"{name} {mode} tiles={tiles} {lay} {what}")
      if "self" in modes and lay == "all_singletons" and float(want["self"][0][0]) == 0.0:
        # No positive pair: exactly 0 with exactly zero gradients, as dense.
        assert float(got["self"][0][0]) == 0.0 and not np.any(np.asarray(got["self"][1]))
  x_nan = x.copy()
  x_nan[0, 1] = np.nan
  labels = label_layouts(B)["m_per_class"]
  got = fs(x_nan, labels, all_valid, ref, ref_labels)
  want = fd(x_nan, labels, all_valid, ref, ref_labels)
  for mode in modes:
    assert np.isnan(float(want[mode][0][0])) and np.isnan(float(got[mode][0][0])), (
        f"{name} {mode}: NaN input must not be hidden")


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity"])
def test_extreme_tile_sizes(name):
  """One column per tile, and more than B (one padded tile)."""
  s_fn, d_fn, kw, _ = CASES[name]
  x = jnp.asarray(random_embeddings(3, B, D))
  labels = jnp.asarray(label_layouts(B)["with_singletons"])
  want = jax.jit(jax.value_and_grad(lambda e: d_fn(e, labels, **kw)))(x)
  for t in (1, 3 * B + 1):
    got = jax.jit(jax.value_and_grad(lambda e, t=t: s_fn(e, labels, tile_size=t, **kw)))(x)
    _check_close(got, want, f"{name} tile={t}")


def test_default_tile_size_is_bounded():
  from metric_jax.streaming import _engine  # pylint: disable=import-outside-toplevel
  assert _engine.default_tile(12, 12) == 12
  assert _engine.default_tile(32768, 32768) * 32768 <= _engine.TILE_ELEMENTS
  assert _engine.default_tile(32768, 32768, per_column=3) < _engine.default_tile(32768, 32768)
  assert _engine.default_tile(1 << 30, 100) >= 1


def _contract_total(e, l, **kw):
  """A sum of streaming losses covering the engine's two kinds of streamed
  statistics: sums and counts (contrastive), online log-sum-exps
  (multi-similarity), both with several tiles (recomputed in the backward
  pass). One sum keeps the number of compilations down; ``"mean"`` (not
  the default ``"mean_nonzero"``, which jumps where a term crosses 0) so
  that one function also serves the numerical gradient check."""
  return (st.streaming_contrastive_loss(e, l, neg_margin=3.0, tile_size=5, reduction="mean",
                                        **kw)
          + st.streaming_multi_similarity_loss(e, l, beta=10.0, tile_size=7, **kw))


def test_contract():
  # Jitted: eager calls would recompile every scan on every call.
  check_loss_contract(jax.jit(_contract_total), zero_without_positives=False)


def test_hyper_parameter_and_learned_metric_gradients():
  """Traced margins and the parameters of a learned metric closed over by
  ``distance`` get the dense gradients (they cross the custom VJP through
  closure conversion)."""
  x = jnp.asarray(random_embeddings(5, B, D))
  labels = jnp.asarray(label_layouts(B)["m_per_class"])
  w0 = jnp.asarray(np.random.default_rng(0).normal(size=(D, 3)).astype(np.float32))

  def metric(w):
    return mj.distances.custom(lambda a, b: mj.distances.pairwise(a @ w, b @ w))

  for s_fn, d_fn, kw, hyper in (
      (st.streaming_multi_similarity_loss, L.multi_similarity_loss, {"beta": 5.0}, "base"),):
    def obj(fn, w, h, tile=None):
      extra = {} if tile is None else {"tile_size": tile}
      return fn(x, labels, distance=metric(w), **{hyper: h}, **kw, **extra)

    gs = jax.jit(jax.grad(lambda w, h: obj(s_fn, w, h, 5), argnums=(0, 1)))(w0, 1.5)
    gd = jax.jit(jax.grad(lambda w, h: obj(d_fn, w, h), argnums=(0, 1)))(w0, 1.5)
    assert float(jnp.abs(gd[0]).max()) > 0 and float(gd[1]) != 0
    for a, b in zip(gs, gd):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("distance", ["squared_euclidean", "cosine"])
def test_symmetric_stream_gradients(distance):
  """A batch against itself with a built-in metric takes the symmetric
  backward pass (one product per tile): the embeddings' gradient and a
  traced temperature's equal the dense loss's, and the plain stream's."""
  from metric_jax.streaming import _engine  # pylint: disable=import-outside-toplevel
  x = jnp.asarray(random_embeddings(6, B, D))
  where = jnp.arange(B) < B - 2
  labels = jnp.asarray(label_layouts(B)["with_singletons"])

  def grads(fn, **kw):
    loss = lambda e, s: fn(e, labels, softmax_scale=s, distance=distance, where=where, **kw)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, 1.7)

  dense = grads(L.nca_loss)
  symmetric = grads(st.streaming_nca_loss, tile_size=5)
  plain_stream = _engine.stream
  try:
    _engine.stream = lambda *args, **kwargs: plain_stream(*args, **{**kwargs, "symmetric": False})
    plain = grads(st.streaming_nca_loss, tile_size=5)
  finally:
    _engine.stream = plain_stream
  assert float(dense[1]) != 0
  for got in (symmetric, plain):
    for a, b in zip(got, dense):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_ids_exclude_self_pairs_in_a_reference_copy():
  """A reference set that contains the anchors themselves, with ids, equals
  the batch compared with itself."""
  x = jnp.asarray(random_embeddings(6, B, D))
  labels = jnp.asarray(label_layouts(B)["with_singletons"])
  ids = jnp.arange(B)
  for name in ("supcon", "nca"):
    s_fn, d_fn, kw, _ = CASES[name]
    # "mean" counts the zero-cost self positives that "mean_nonzero" skips.
    kw = dict(kw, reduction="mean")
    want = d_fn(x, labels, **kw)
    f = jax.jit(lambda i, ri, s_fn=s_fn, kw=kw: s_fn(x, labels, x, labels, ids=i, ref_ids=ri,
                                                     tile_size=5, **kw))
    np.testing.assert_allclose(float(f(ids, ids)), float(want), rtol=2e-5, err_msg=name)
    # Disjoint ids: each anchor is its own positive at distance 0.
    without = f(ids, ids + B)
    assert abs(float(without) - float(want)) > 1e-4, name


def test_pair_mask_matches_dense():
  x = jnp.asarray(random_embeddings(7, B, D))
  labels = jnp.asarray(label_layouts(B)["m_per_class"])
  pm = jnp.asarray(np.random.default_rng(1).random((B, B)) < 0.6)
  for name in ("ntxent", "nca"):
    s_fn, d_fn, kw, _ = CASES[name]
    got = jax.jit(jax.value_and_grad(
        lambda e: s_fn(e, labels, pair_mask=pm, tile_size=5, **kw)))(x)
    want = jax.jit(jax.value_and_grad(lambda e: d_fn(e, labels, pair_mask=pm, **kw)))(x)
    _check_close(got, want, name)


def test_more_positives_than_max_positives_is_nan():
  x = jnp.asarray(random_embeddings(8, B, D))
  labels = jnp.asarray(label_layouts(B)["m_per_class"])     # 2 positives per anchor
  f = jax.jit(functools.partial(st.streaming_triplet_margin_loss, mining="all"),
              static_argnames="max_positives")
  assert np.isfinite(float(f(x, labels, max_positives=2)))
  assert np.isnan(float(f(x, labels, max_positives=1)))
  assert np.isnan(float(L.triplet_margin_loss(x, labels, mining="all", max_positives=1)))


@pytest.mark.parametrize("name", ["contrastive", "triplet_all"])
def test_memory_is_bounded_by_the_tile(name, monkeypatch):
  """At B = 4096 the compiled forward+backward plans less temporary memory
  than a single [B, B] float32 matrix (64 MiB): the dense loss plans several
  (contrastive's dense call hands such a batch to the streamed twin)."""
  s_fn, d_fn, kw, _ = CASES[name]
  b, d, tile = 4096, 16, 128
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
  labels = jnp.asarray(np.repeat(np.arange(b // 4), 4).astype(np.int32))
  if "max_positives" in kw:        # [B, P, T] blocks: P times fewer columns
    kw, tile = dict(kw, max_positives=3), tile // 2

  def temp(fn):
    compiled = jax.jit(jax.value_and_grad(lambda e: fn(e, labels))).lower(emb).compile()
    stats = compiled.memory_analysis()
    if stats is None:
      pytest.skip("backend without memory analysis")
    return stats.temp_size_in_bytes

  matrix = b * b * 4
  streamed = temp(functools.partial(s_fn, tile_size=tile, **kw))
  assert streamed < matrix / 4, (streamed, matrix)
  if name == "contrastive":
    from metric_jax.streaming import _engine  # pylint: disable=import-outside-toplevel
    assert temp(functools.partial(d_fn, **kw)) < matrix / 4          # routed
    monkeypatch.setattr(_engine, "ROUTE_MIN_ELEMENTS", 1 << 40)
    assert temp(functools.partial(d_fn, **kw)) > matrix


def test_bad_inputs():
  x = jnp.ones((4, 3))
  y = jnp.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="max_positives"):
    st.streaming_triplet_margin_loss(x, y, mining="all")
  with pytest.raises(TypeError, match="max_positives"):
    st.streaming_triplet_margin_loss(x, y, mining="all", max_positives=2.0)
  with pytest.raises(ValueError, match="reduction"):
    st.streaming_contrastive_loss(x, y, reduction="none")
  with pytest.raises(ValueError, match="reduction"):
    st.streaming_triplet_margin_loss(x, y, mining="all", max_positives=1, reduction="none")
  with pytest.raises(ValueError, match="reduction"):
    st.streaming_ntxent_loss(x, y, reduction="mean_all")
  with pytest.raises(ValueError, match="tile_size"):
    st.streaming_multi_similarity_loss(x, y, tile_size=0)
  with pytest.raises(TypeError, match="tile_size"):
    st.streaming_supcon_loss(x, y, tile_size=2.5)
  with pytest.raises(ValueError, match="ids"):
    st.streaming_contrastive_loss(x, y, ids=jnp.arange(4), ref_ids=jnp.arange(4))
  with pytest.raises(ValueError, match="ref_ids"):
    st.streaming_contrastive_loss(x, y, x, y, ids=jnp.arange(4))
  with pytest.raises(ValueError, match="ref_ids"):
    st.streaming_contrastive_loss(x, y, x, y, ids=jnp.arange(4), ref_ids=jnp.arange(3))
  with pytest.raises(ValueError, match="axis_name"):
    st.streaming_circle_loss(x, y, x, y, axis_name="data")
  with pytest.raises(ValueError, match="distance"):
    st.streaming_circle_loss(x, y, distance="euclidean")
  with pytest.raises(ValueError, match="labels"):
    st.streaming_lifted_structure_loss(x, y[:3])
  with pytest.raises(TypeError, match="embeddings"):
    st.streaming_npair_loss(jnp.ones((4, 3), jnp.int32), y)
  with pytest.raises(ValueError, match="ref_labels"):
    st.streaming_generalized_lifted_structure_loss(x, y, x)
  with pytest.raises(ValueError, match="mining"):
    st.streaming_triplet_margin_loss(x, y, mining="hardest")
  with pytest.raises(ValueError, match="ref_negatives"):
    st.streaming_lifted_structure_loss(x, y, ref_negatives="both")


def test_exported():
  assert set(st.__all__) >= {
      "streaming_contrastive_loss", "streaming_triplet_margin_loss",
      "streaming_lifted_structure_loss", "streaming_generalized_lifted_structure_loss",
      "streaming_multi_similarity_loss", "streaming_circle_loss", "streaming_ntxent_loss",
      "streaming_supcon_loss", "streaming_nca_loss", "streaming_npair_loss",
      "streaming_ranked_list_loss", "sharded_loss"}
  for name in st.__all__:
    fn = getattr(st, name)
    assert fn.__doc__ and "Example:" in fn.__doc__ and "{common}" not in fn.__doc__, name


# Contrastive, multi-similarity and circle hand over only a batch against
# itself (the symmetric backward pass); contrastive only with a reduction
# other than "none".
_ROUTED_CALLS = {"contrastive": ("self",), "contrastive_cosine_squared": ("self",),
                 "multi_similarity": ("self", "none"), "circle": ("self", "none")}


@pytest.mark.parametrize("routed_loss", ["nca", "generalized_lifted", "generalized_lifted_zero",
                                         "ranked_list", "ranked_list_pml_none", "triplet_hard",
                                         "triplet_easy_swap_soft", "contrastive",
                                         "contrastive_cosine_squared", "multi_similarity",
                                         "circle"])
def test_large_dense_problems_are_streamed(monkeypatch, routed_loss):
  """Dense losses with a streamed twin hand large problems to it
  (``_engine.ROUTE_MIN_ELEMENTS``): forced here at B = 12, the dense call
  compiles to a loop over tiles and keeps the dense values and gradients
  (self and reference modes, padding, pair masks, every reduction); the
  calls a loss keeps dense stay dense."""
  from metric_jax.streaming import _engine  # pylint: disable=import-outside-toplevel
  _, d_fn, kw, _ = CASES[routed_loss]
  x, ref, ref_labels = _inputs()
  labels = jnp.asarray(label_layouts(B)["with_singletons"])
  where = jnp.asarray(np.arange(B) < B - 2)
  pm = jnp.asarray(np.random.default_rng(2).random((B, M)) < 0.7)
  calls = {
      "self": lambda e, r: jnp.sum(d_fn(e, labels, where=where, **kw)),
      "ref": lambda e, r: d_fn(e, labels, r, ref_labels, where=where, pair_mask=pm,
                               **dict(kw, reduction="sum")),
      "none": lambda e, r: jnp.sum(d_fn(e, labels, where=where, **dict(kw, reduction="none"))),
  }

  def run(fn):
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    return step(x, ref), step.lower(x, ref).as_text()

  dense = {name: run(fn) for name, fn in calls.items()}
  monkeypatch.setattr(_engine, "ROUTE_MIN_ELEMENTS", 1)
  monkeypatch.setattr(_engine, "_MIN_TILE", 1)
  monkeypatch.setattr(_engine, "ROUTE_TILE_ELEMENTS", 4 * B)      # 4-column tiles
  for name, fn in calls.items():
    got, hlo = run(fn)
    routed = name in _ROUTED_CALLS.get(routed_loss, calls)
    assert ("while" in hlo) == routed and "while" not in dense[name][1], name
    _check_close(got, dense[name][0], f"{routed_loss} {name} routed={routed}")
  assert _engine.routed_tile(jnp.ones((B,)), None) is None      # malformed: dense checks


def test_routed_tile_sizes(monkeypatch):
  from metric_jax.losses import _grid  # pylint: disable=import-outside-toplevel
  from metric_jax.streaming import _engine  # pylint: disable=import-outside-toplevel
  assert _engine.routed_tile(jnp.ones((1024, 8)), jnp.ones((1024, 8))) is None
  assert _engine.routed_tile(jnp.ones((2048, 8))) == _engine.ROUTE_TILE_ELEMENTS // 2048
  assert _engine.routed_tile(jnp.ones((2048, 8)), jnp.ones((64, 8))) is None
  assert _engine.routed_tile(jnp.ones((64, 8)), jnp.ones((1 << 16, 8))) == 1 << 13
  huge = _engine.routed_tile(jax.ShapeDtypeStruct((1 << 20, 8), jnp.float32))
  assert huge == _engine.default_tile(1 << 20, 1 << 20)
  assert not _grid.in_one_piece(_grid.GRID_ELEMENTS + 1)
  # The small-buffer paths are for XLA:CPU's allocator; accelerators stay dense.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _engine.routed_tile(jnp.ones((2048, 8))) is None
  assert _grid.in_one_piece(_grid.GRID_ELEMENTS + 1)
