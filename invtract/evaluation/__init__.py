"""Hard, non-differentiable evaluation: tck2connectome's connectome and tractogram metrics.

Nothing here imports torch, so ``invtract connectome`` starts as fast as numpy and nibabel
allow. The differentiable counterparts (soft connectome, losses) live in
:mod:`invtract.losses`.
"""
