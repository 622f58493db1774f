"""The runner's `features` stage: feature pages (mechanic.locate.feature_pages) of the latents a feature recipe
steered and the top ones it located, read on held-out prose no other stage reads, for the run report.

Text: the held-out split of the default dictionary corpus (GCIDE, every fifth passage), which the
dictionary stage does not train on and the evaluation does not read (its perplexity reads
mechanic.data.text.heldout(), the select stage mechanic.data.text.calibration()); no task rows. If the
corpus is not installed (a recipe that brings its own dictionary), the shipped calibration prose is read
instead and the page says so. Tokens: a quarter of what the recipe's dictionary trained on, between
2,048 and 32,768 (a brought dictionary: 32,768), so the pages cost a fraction of the dictionary stage.
"""

from __future__ import annotations

from pathlib import Path

from mechanic.recipes.methods import StageOut

MAX_CARDS = 10
GCIDE_HELDOUT = ("default dictionary corpus (GCIDE), held-out split: every fifth passage, not trained on by the "
                 "dictionary stage and not read by the evaluation")
CALIBRATION = ("mechanic's shipped calibration prose (mechanic.data.text.calibration(), not the evaluation's "
               "held-out prose; the default dictionary corpus is not installed)")


def wanted(found: StageOut, steered: StageOut) -> dict | None:
    """What the stage shows, or None when the recipe has no dictionary latents: {site, dictionary, cards:
    [(latent id, steered, located rank or None, attribution or None)]}, steered latents first, up to MAX_CARDS."""
    from mechanic.model.sites import Site

    data = found.data
    if "dictionary" not in data or "site" not in data:
        return None
    # several dictionaries (graph_features over every layer): pages of the first, the top latent's layer
    site, dictionary = ((data["site"], data["dictionary"]) if isinstance(data["site"], str)
                        else (data["site"][0], data["dictionary"][0]))
    prefix = f"{site}.sae"
    located = [x for x in data.get("latents", []) if x.startswith(prefix)]
    plan = [x for x in steered.data.get("latents", []) if x.startswith(prefix)]
    if not located and not plan:
        return None
    score = {r[0]: r[1] for f in found.figures if f.get("id") == "latents" for r in f["rows"]}
    names = list(dict.fromkeys(plan + located))[: max(MAX_CARDS, len(plan))]
    cards = [(Site.parse(x).index, x in plan, located.index(x) + 1 if x in located else None, score.get(x))
             for x in names]
    return {"site": site, "dictionary": dictionary, "cards": cards, "located": len(located)}


def page_tokens(train_tokens: int | None) -> int:
    """Held-out tokens to read: a quarter of the dictionary's training tokens in [2,048, 32,768]; 32,768 if unknown."""
    return 32768 if train_tokens is None else max(2048, min(32768, train_tokens // 4))


def text_source() -> tuple[object, str]:
    """(text for mechanic.locate.feature_pages, its description): the corpus's held-out split, else calibration prose."""
    from mechanic.features.corpus import corpus_file

    if corpus_file() is not None:
        return None, GCIDE_HELDOUT
    from mechanic.data.text import calibration

    return calibration(), CALIBRATION


def pages_stage(model, want: dict, tokens: int, out: Path) -> StageOut:
    """Scan the held-out text for the wanted latents; data is the page JSON, each feature with its `role`."""
    from mechanic.features import load
    from mechanic.locate.feature_pages import feature_pages

    text, described = text_source()
    d = load(want["dictionary"])
    ids = [c[0] for c in want["cards"]]
    data = feature_pages(model, d, text=text, features=ids, tokens=tokens, seq_len=128)
    data["text"] = described
    data["dictionary"]["path"] = str(want["dictionary"])
    n_plan = sum(c[1] for c in want["cards"])
    data["selection"] = (f"{n_plan} latent(s) the plan steers and the top located ones, {len(ids)} of the "
                         f"{want['located']} located (of {d.d_sae:,} latents)")
    for f, (_, steered, rank, attribution) in zip(data["features"], want["cards"]):
        f["role"] = {"latent": f"{want['site']}.sae{f['id']}", "steered": steered, "rank": rank,
                     "attribution": attribution}
    fired = sum(f["count"] > 0 for f in data["features"])
    text = (f"Feature pages of {len(ids)} latents ({n_plan} steered by the plan) read on {data['tokens']:,} tokens of "
            f"the {described}: {fired} of them fire there. Top contexts, activation histograms and logit effects are "
            "in the Features section.")
    return StageOut(text, [], data, {})
