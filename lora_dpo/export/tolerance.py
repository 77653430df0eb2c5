"""The merge's numbers that the command line shows before anything loads (cli/arguments.py): the dtypes a merged
model is saved in, and the tolerance of the check that compares it with base + adapter (merge.py)."""

# Merge check, per completion token: |log p_merged - log p_base+adapter| <= atol + rtol * |log p_base+adapter|,
# both models in the dtype of the check (peft keeps the unmerged adapter in fp32): fp32 where the base fits in it
# (merge.py), else the export dtype. The saved model is checked against the merged one cast to the export dtype
# with that dtype's bounds. What differs between them is only
# that W + BA is rounded to the dtype once, and that x(W + BA) sums in another order than xW + (xA)B. Unit
# roundoff: fp32 6e-8, fp16 4.9e-4, bf16 2.0e-3. Largest differences measured over ~140 tokens on random
# Llamas (hidden 256) with 2 / 8 / 24 layers: fp32 2.4e-6 / 2.9e-6 / 3.3e-6, fp16 3.2e-3 / 4.9e-3 / 6.0e-3, bf16
# 2.3e-2 / 3.2e-2 / 5.3e-2 nats: growing slowly with depth, in the ratio of the dtypes' roundoff. The bounds sit
# above the deepest of these (and the rtol term widens them for the unlikely tokens, whose log-probs carry the
# largest errors), while a merge that lost, doubled or misplaced the adapter moves log-probs by about the
# adapter's own effect (0.5-1.2 nats in the same runs): that is reported beside, with a warning when it is
# within the tolerance, so that a blind check is never mistaken for a passed one. On a real model the bf16 bound does
# not hold: SmolLM2-135M (30 layers, hidden 576) moves 0.16 nats from rounding its fp32 weights to bf16 alone, and
# 0.28 between merged and unmerged in bf16, while its merge in fp32 agrees to 2.3e-5: hence the check in fp32.
TOLERANCES = {"bf16": (1e-1, 5e-2), "fp16": (2e-2, 1e-2), "fp32": (1e-4, 1e-4)}  # (atol nats, rtol)
DTYPES = tuple(TOLERANCES)  # dtypes of a merged model: bf16, fp16, fp32 (model/load.py maps them to torch's)
VERIFY_PAIRS = 4  # pairs (two sequences each) scored by both models

# GGUF types llama.cpp's convert_hf_to_gguf.py writes itself (export/gguf.py), here for the light command line
GGUF_TYPES = ("bf16", "f16", "f32", "q8_0")
