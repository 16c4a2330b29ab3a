"""The post-purification probes of Min et al. (NeurIPS 2024): the retuning attack and the query-based
reactivation attack (QRA).

``config`` (the settings, free of torch so the command line can build its parser cheaply), ``sources`` (which
model, which clean subset, which poisoned images), ``perturbation`` (QRA's generator), ``retune`` and ``qra``
(the two attacks), ``output`` (the one writer of their files). Nothing is imported here: importing
``fst_plugin.probes.config`` must not load torch.
"""
