"""SAELens compatibility: the committed side-by-side result (benchmarks/saelens/compat.py run against sae-lens
itself) says every architecture round-trips both ways within 1e-5, and non-trivially (latents were active)."""

import json
from pathlib import Path

RESULT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "saelens_compat.json"
SAELENS_ARCHS = {"standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                 "jumprelu_skip_transcoder"}


def test_committed_saelens_comparison_holds():
    r = json.loads(RESULT.read_text())
    assert r["tolerance"] <= 1e-5 and r["sae_lens_version"].startswith("6.")
    for direction in ("mechanic_to_saelens", "saelens_to_mechanic"):
        rows = r[direction]
        assert {row["written_as"] for row in rows.values()} >= SAELENS_ARCHS, direction
        for name, row in rows.items():
            assert "error" not in row, (direction, name, row.get("error"))
            assert max(row["max_abs_diff"].values()) <= 1e-5, (direction, name, row["max_abs_diff"])
            assert 0 < row["mean_l0"] < r["d_sae"], (direction, name)   # the comparison saw active and inactive latents
    # mechanic's BatchTopK goes out as SAELens's inference form, a JumpReLU with the batch threshold
    assert r["mechanic_to_saelens"]["batchtopk"]["written_as"] == "jumprelu"
    assert r["mechanic_to_saelens"]["batchtopk"]["saelens_class"] == "JumpReLUSAE"
    assert r["all_within_tolerance"] is True


def test_features_doc_quotes_the_committed_results():
    """docs/FEATURES.md states numbers only from benchmarks/results (SAELens comparison and the SmolLM2 SAE)."""
    doc = (RESULT.parent.parent.parent / "docs" / "FEATURES.md").read_text()
    compat = json.loads(RESULT.read_text())
    sae = json.loads((RESULT.parent / "sae_smollm2.json").read_text())
    h = sae["heldout"]
    for text in (f"{compat['max_abs_diff_overall']:.1e}", compat["sae_lens_version"],
                 f"{sae['train_tokens']:,} in {sae['train_seconds']:,.0f} s ({sae['train_tokens_per_s']:.0f} tokens/s",
                 f"| {h['fvu']:.3f} |", f"| {h['l0']:.1f} |", f"{100 * h['dead_fraction']:.2f}% / {100 * h['dense_fraction']:.2f}%",
                 f"{h['ce_original']:.3f} / {h['ce_spliced']:.3f} / {h['ce_zero_ablated']:.3f}",
                 f"{100 * h['ce_loss_recovered']:.1f}%", f"{h['kl_spliced']:.3f} nats", f"held-out FVU ({h['tokens']:,} tokens)",
                 f"CE loss recovered ({h['ce_tokens']:,} tokens)", sae["site"]):
        assert text in doc, text
