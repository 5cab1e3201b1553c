"""Shared settings of the Magnet configs (digits_magnet.py, omniglot_magnet.py)."""


def use_magnet(c, *, clusters_per_batch: int, examples_per_cluster: int,
               clusters_per_class: int, refresh_every: int) -> None:
  """Switches an unlocked config to the Magnet loss on the neighbourhood
  sampler: M = ``clusters_per_batch`` clusters x D = ``examples_per_cluster``
  examples a batch, K = ``clusters_per_class`` k-means clusters per class,
  cluster index rebuilt every ``refresh_every`` steps and per-cluster
  losses fed back to the sampler after every step (Rippel et al., ICLR 2016)."""
  c.loss.name = "magnet_loss"
  c.loss.kwargs = {"alpha": 1.0}
  c.loss.normalize_embeddings = False
  c.sampler.name = "magnet"
  c.sampler.kwargs = {"clusters_per_batch": clusters_per_batch,
                      "examples_per_cluster": examples_per_cluster,
                      "clusters_per_class": clusters_per_class}
  c.sampler.refresh_every = refresh_every
  c.sampler.update_every = 1
