"""The significance level of every statistical test in the suite, and why it is this small.

Each statistical test draws its samples from fixed seeds, so a run is deterministic. What is left
to chance is the draw itself: any change to how random numbers are consumed (a refactor of a
verifier, a new torch) redraws every sample, and a correct implementation then fails a test with
probability ALPHA (its p-value is uniform under the null hypothesis; pooling rare outcomes only
makes the chi-square test more conservative). By the union bound the default tier, with K such
tests, fails by chance with probability at most K * ALPHA.

K in the default tier (count them again when adding one):
- test_rejection_sampling.py: 13 (5 cases x rejection, 5 x block verification, 3 more)
- test_trees.py: 11 (8 verifier / tree pairs on the plain case, 3 on a harder case; the slow tier
  runs the other 21 combinations)
- test_certify.py: 9 (8 lossless configurations through `certify`, 1 homogeneity test)
- test_lossless_real.py: 2 (rejection on a real model's next-token distributions)
- test_eagle.py: 1 (certify with a trained head's drafts; 2 more in the slow tier)
- test_medusa_hydra.py: 2 (certify with trained Medusa and Hydra heads' drafts)
- test_batching.py: 1 (sampling with sequences verified in shared forwards)
K = 39, so K * ALPHA = 3.9e-4. Two more kinds of chance assertion are in the default tier:
- test_analyze.py flags a method measured more than 4 standard errors above its bound, and a
  lossless one must not be flagged: one-sided, 3.2e-5 each, 6 methods, 1.9e-4 in all;
- test_certify.py's total-variation bounds sit about five standard deviations from their
  expected values (under 1e-6 each).
In all, under 6e-4: the default tier fails by chance less than once in a thousand runs.
The slow tier adds 23 such tests at ALPHA (K = 62 with them) and its statistical tests on
real models, which use their own, stated levels.

A deliberately broken variant counts as caught when its p-value is below BROKEN; the margin
between the two levels keeps a redraw from turning a caught variant into a missed one.
"""

ALPHA = 1e-5  # a correct implementation passes when p > ALPHA
BROKEN = 1e-8  # a broken variant is caught when p < BROKEN
