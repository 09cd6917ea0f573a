"""What the paper states and the constants hcdiag fixes where it is loose: one module, imported everywhere.

Nothing here computes; :mod:`hcdiag.claims` turns measurements into verdicts against these numbers. Every
other module reads its thresholds, conventions, methods and the paper's numbers from here, so that one
boundary (``KL < COLLAPSE_KL`` means collapsed) holds everywhere.

>>> COLLAPSE_KL, LOSS_CONVENTIONS
(0.01, ('literal', 'scaled', 'mean'))
"""

from __future__ import annotations

# claims.md "Collapse metrics": a model is collapsed when its mean KL(q(z|x) || N(0, I)) is BELOW this many
# nats, and non-collapsed when it is at least this (one boundary: KL == 0.01 is not collapsed).
COLLAPSE_KL = 0.01
# claims.md "Collapse metrics": Burda et al. 2015's active-unit threshold on Var_x(mu_j) (hcdiag.metrics uses He
# et al. 2019's calc_au form: unbiased variance, >=; the closed form and the linear VAE use > on the population
# variance, which differ only at exactly this value)
AU_THRESHOLD = 0.01
# claims.md: relative tolerance tau of a region membership, L <= eps (1 + tau)
DEFAULT_TOLERANCE = 0.05

# the training loss conventions (claims.md, Training pipeline) and the methods of the system under test
LOSS_CONVENTIONS = ("literal", "scaled", "mean")
METHODS = ("hct", "vanilla", "beta", "anneal", "freebits", "aggressive", "em-type", "teacher")
DATASETS = ("synthetic", "fashion-mnist", "mnist", "cifar10", "digits")

# paper Table 1 (sigma'^2 = 2 lambda_max; KL, active units) and the text's thresholds (section 5.2, 8)
PAPER_TABLE1 = {
    "synthetic": {"vanilla": (0.32, 5.1), "beta2": (0.41, 6.2), "beta4": (0.22, 3.4), "anneal": (0.45, 6.8),
                  "em-type": (0.51, 7.2), "hct:pre": (2.67, 5), "hct:post": (2.59, 4), "hct:final": (2.64, 4)},
    "mnist": {"vanilla": (0.28, 4.8), "beta2": (0.38, 5.9), "beta4": (0.19, 3.1), "anneal": (0.42, 6.5),
              "em-type": (0.48, 7.0), "hct:pre": (2.08, 2), "hct:post": (2.51, 2), "hct:final": (0.00, 0)},
    "fashion-mnist": {"vanilla": (0.31, 4.6), "beta2": (0.42, 5.7), "beta4": (0.24, 2.9), "anneal": (0.44, 6.3),
                      "em-type": (0.50, 6.8), "hct:pre": (2.38, 2), "hct:post": (2.49, 3), "hct:final": (2.64, 2)},
    "cifar10": {"vanilla": (0.18, 2.3), "beta2": (0.25, 3.1), "anneal": (0.31, 4.2), "hct:pre": (3.66, 3),
                "hct:post": (3.55, 3), "hct:final": (3.70, 3)},
}
PAPER_KL_THRESHOLD = {"synthetic": 2.5, "mnist": 2.0, "fashion-mnist": 2.0, "cifar10": 3.5, "digits": 2.0}
# paper Table 2 (CIFAR-10, convolutional encoder/decoder, section 5.6): KL, active units, MS-SSIM
PAPER_TABLE2 = {"vanilla": (0.18, 2.3, 0.35), "beta2": (0.25, 3.1, 0.38), "anneal": (0.31, 4.2, 0.42),
                "hct": (3.55, 3, 0.52)}
# paper section 5.5 (Figure 4, Figure 8 and the text): where each claim is, the claim, the best value
PAPER_ABLATION = {
    "r0": ("5.5.1, Figure 4 left", "final KL improves with R0 up to R0 = 16, then saturates", 16),
    "eps": ("5.5.2, Figure 4 right", "eps = 1e-5 gives the best final KL", 1e-5),
    "beta_end": ("5.5, Figure 8", "beta in [2, 3] gives the best final KL", (2.0, 3.0)),
    "keep_ratio": ("5.5.3", "keep ratio 1/2 performs best", 0.5),
}
ABLATION_LABELS = {"r0": "R0", "eps": "eps", "beta_end": "beta", "keep_ratio": "keep ratio"}

# the barrier checks of check-barrier as claims of the paper: (short claim, section); the check's own
# precise statement is its CheckResult.claim
BARRIER_CLAIMS = {
    "N1": ("Lemma 4.3 (N1): thresholds shrink", "Lemma 4.3"),
    "N2": ("Lemma 4.3 (N2) / Figure 2 left: later snapshots stay in earlier regions", "Lemma 4.3, Fig. 2"),
    "N3": ("Lemma 4.3 (N3): no witness of F_{t+1} \\ F_t", "Lemma 4.3"),
    "T1": ("Theorem 4.4 (T1, paper's delta): eps_T < delta", "Theorem 4.4"),
    "T2": ("Theorem 4.4 (T2): F_T excludes every collapsed model", "Theorem 4.4"),
    "T2b": ("Refinement reaches eps", "4.2.2"),
    "T3": ("Constructed collapsed model is collapsed, l_C >= delta_C", "5.3"),
    "T4": ("Witness certificate: the final encoder is not constant", "companion notes"),
    "I1": ("Corollary 4.5 (I1): stage 3 stays in F_T with KL >= 0.01", "Corollary 4.5"),
    "I2": ("Corollary 4.5 (I2): paths to collapsed models inside F_T leave it", "Corollary 4.5"),
    "I3": ("Figure 2 right (I3): distance to the collapsed model grows", "5.3, Fig. 2"),
    "KL": ("The final model is not collapsed (KL >= 0.01)", "5.1.4, 5.4"),
    "AU": ("At least one latent dimension stays active", "5.1.4, 5.2"),
}

# check I2's straight paths to collapsed models: key in the check's values -> what the path leads to
I2_PATHS = {"to_witness": "the T2 witness (an exactly collapsed model, KL = 0)",
            "to_collapsed": "the collapsed reference (references.collapsed)",
            "to_constant_output": "the best constant in output space (the architecture cannot express it)"}

INCONSISTENCIES = [
    ("R0", "16 (section 5.5.1) vs 24 (Table 3); 24 is not a power of two, which Algorithm 1 requires"),
    ("refinement eps", "1e-5 (sections 4.2.2, 5.5.2) vs 1e-4 (Table 3)"),
    ("latent dimension", "8 (section 5.1.3) vs 48 (Table 3, and '2 out of 48 active' in 5.2)"),
    ("MLP widths", "[256,128]/[128,256] (section 5.1.3) vs [1024,512,256] (Table 3)"),
    ("active-unit definition", "E[s_j^2(x)] < 0.99 (5.1.4, citing Burda) vs variance > 0.005 (5.2, Table 3); "
                               "Burda et al. use Var_x(mu_j) > 0.01"),
    ("KL arrows", "Tables 1 and 2 head KL with a down arrow, though higher KL means less collapse"),
    ("vanilla collapse", "'vanilla VAE collapses completely (KL < 0.01)' (5.2, 8) vs KL 0.18-0.32 with 2.3-5.1 "
                         "active units (Table 1)"),
    ("MNIST stage 3", "final single-cluster KL 0.00 on MNIST (Table 1), against Corollary 4.5"),
    ("'epoch'", "Algorithm 1: one batch per clustering per epoch; 4.2.1: E epochs cycling through R_t; the "
                "paper's cost (2-3x vanilla, 6.2; 4-6 h vs 1-2 h, B.2) fits only one data pass per epoch cycling "
                "through R_t (all three supported: epoch_unit steps, epochs, data_pass; the paper preset: "
                "data_pass)"),
    ("cycling vs simultaneous", "Algorithm 1 cycles one clustering per step; 4.1 trains 'simultaneously' "
                                "(both supported: mode cycle, simultaneous)"),
    ("loss scaling", "eq. 7 does not say how the terms are scaled (conventions literal, scaled, mean, and a "
                     "beta warm-up from 0)"),
    ("Lemma 4.3 proof", "K_{t+1} ⊂ K_t makes the max over K_{t+1} smaller, so F_{t+1} is in general larger"),
    ("Theorem 4.4 proof", "assumes the collapsed model reconstructs the data mean; a constant between two "
                          "centroids has historical loss delta* <= eps_T"),
]

# claims.md P1: a trained linear VAE "matches" the closed form when its total KL and every one of its
# per-dimension KLs (sorted, largest first) lie within LINEAR_KL_ATOL + LINEAR_KL_RTOL * theory nats of the
# closed form, and its count of active units (Burda) equals the closed form's
LINEAR_KL_ATOL = 0.02
LINEAR_KL_RTOL = 0.02
