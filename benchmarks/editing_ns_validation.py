"""AlphaEdit's neighbourhood success (NS) after a sequence of edits, on validation facts only: candidate null spaces
and v* settings scored by the sequential validation protocol (editing_sequential.sequence_scores, which runs
mechanic.steer.sequential)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import mechanic
from mechanic.improve.edit_metrics import _pairs, counterfact, target_logprobs
from mechanic.steer.alphaedit import NullSpaces, with_preserved
from mechanic.steer.edit import layer_range
from mechanic.steer.stats import prompt_moments, second_moments

sys.path.insert(0, str(Path(__file__).parent))
from editing_sequential import OPT, facts_of, sequence_scores  # noqa: E402

OUT = Path(__file__).parent / "results" / "editing_ns_validation.json"


def preserve_prompts(m) -> list[str]:
    """The train facts' prompts, paraphrases and neighbourhood prompts: keys like the neighbours' that AlphaEdit's
    `preserve` can hold (train split only)."""
    return [t for f in facts_of(m, "train", 10 ** 6) for t in (f.prompt, *f.paraphrases, *f.neighborhood)]


class Anchored(NullSpaces):
    """AlphaEdit's null spaces holding, besides the edits so far, per batch the keys (every token) of its anchor
    prompts, read on the model as the batch's spread finds it (the Kp Kp^T term); anchors: one list per batch."""

    def __init__(self, model, anchors: list[list[str]], threshold: float = 2e-2):
        super().__init__(threshold)
        self.model, self.anchors, self.batch = model, anchors, 0

    def held(self, layer: int):
        site = f"L{layer}.neuron"
        Ka = torch.cat([self.model.run(t, cache=[site], stop_at="auto")[site][0].double()
                        for t in self.anchors[self.batch]]).T
        prev = super().held(layer)
        return Ka @ Ka.T if prev is None else prev + Ka @ Ka.T

    def record(self, keys) -> None:
        super().record(keys)
        self.batch += 1


def candidates(m, val, layers, batch: int, moments: dict, extra: dict | None, preserved: list[str], train) -> dict:
    """{name: run() -> its settings and sequence_scores} for every candidate; `moments` {stats_tokens: second
    moments}, `extra` the preserved prompts' second moment (prompt_moments of `preserved`), `train` the facts whose
    prompts anchor a batch. Candidates with the same v* settings optimise the first batch's targets once."""
    targets: dict = {}

    def alphaedit_candidate(stats=16384, threshold=2e-2, energy=None, alpha=10.0, preserve=False, opt=None,
                            prompt_key=True, state=None, **more):
        state = state if state is not None else NullSpaces(threshold, energy)
        kept = {"preserve": preserved} if preserve else {}
        r = sequence_scores(m, val, "alphaedit", batch, layers, stats, targets, state, threshold=threshold,
                            energy=energy, alpha=alpha, prompt_key=prompt_key, **kept, **{**OPT, **(opt or {})})
        M = {L: with_preserved(moments[stats][L][0], extra[L]) if preserve else moments[stats][L][0].double()
             for L in layers}     # the share of the preserved keys' energy the update can reach
        share = {L: round(float(torch.trace(state.projections[L] @ M[L]) / M[L].trace()), 5) for L in layers}
        return {"method": "alphaedit", "stats_tokens": moments[stats][layers[0]][1], "threshold": threshold,
                "energy": energy, "alpha": alpha, "preserve": preserve, "null_dims": dict(state.dims),
                "null_energy": share, "prompt_key": prompt_key, **(opt or {}), **more, **r}

    def anchored_candidate(alpha=10.0):
        """AlphaEdit plus, per batch, the keys of the train facts' prompts, paraphrases and neighbourhood prompts
        whose true answer is one of the batch's true answers, held like earlier edits' keys (Anchored)."""
        batches = [val[i:i + batch] for i in range(0, len(val), batch)]
        anchors = [[t for f in train if f.target_true in {g.target_true for g in b}
                    for t in (f.prompt, *f.paraphrases, *f.neighborhood)] for b in batches]
        return alphaedit_candidate(alpha=alpha, state=Anchored(m, anchors), anchors=[len(a) for a in anchors])

    def memit_candidate(lam=1000.0, opt=None):
        r = sequence_scores(m, val, "memit", batch, layers, 16384, targets, lam=lam, prompt_key=True,
                            **{**OPT, **(opt or {})})
        return {"method": "memit", "lam": lam, **(opt or {}), **r}

    return {
        "alphaedit_baseline": lambda: alphaedit_candidate(),
        "memit_baseline": lambda: memit_candidate(),
        "alphaedit_energy_1e-2": lambda: alphaedit_candidate(energy=1e-2),
        "alphaedit_energy_1e-2_alpha1": lambda: alphaedit_candidate(energy=1e-2, alpha=1.0),
        "alphaedit_energy_5e-2": lambda: alphaedit_candidate(energy=5e-2),
        "alphaedit_energy_5e-2_alpha1": lambda: alphaedit_candidate(energy=5e-2, alpha=1.0),
        "alphaedit_stats65k_energy_1e-2_alpha1": lambda: alphaedit_candidate(stats=65536, energy=1e-2, alpha=1.0),
        "alphaedit_preserve_energy_1e-2": lambda: alphaedit_candidate(preserve=True, energy=1e-2),
        "alphaedit_preserve_energy_1e-2_alpha1": lambda: alphaedit_candidate(preserve=True, energy=1e-2, alpha=1.0),
        "alphaedit_kl1": lambda: alphaedit_candidate(opt={"kl_factor": 1.0}),
        "alphaedit_clamp1": lambda: alphaedit_candidate(opt={"clamp": 1.0}),
        "alphaedit_no_prompt_key": lambda: alphaedit_candidate(prompt_key=False),
        "alphaedit_anchored": lambda: anchored_candidate(),
        "memit_kl1": lambda: memit_candidate(opt={"kl_factor": 1.0}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--facts", type=int, default=30)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--layer", type=int, default=5, help="the averaged trace's layer over train facts "
                   "(editing_sequential.py: 5); MEMIT/AlphaEdit edit the 5 layers ending there")
    p.add_argument("--only", help="comma-separated candidate names to run (default: all not yet in the JSON)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    m = mechanic.load("smollm2")
    val = facts_of(m, "validation", args.facts)
    layers = layer_range(args.layer)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result |= {"facts": [f"{f.subject} ->{f.target_new}" for f in val], "batch": args.batch, "layers": layers,
               "protocol": f"{len(val)} validation facts of facts_large in batches of {args.batch}, targets optimised "
                           "on the model with the earlier batches applied, prompt_key on unless said; ES/PS/NS over all facts "
                           "after each batch"}
    result.setdefault("candidates", {})
    if "unedited" not in result:
        result["unedited"] = {k: round(v, 4) for k, v in counterfact(m, val).items() if k != "n"}
        result["unedited_every"] = {k: round(v, 4) for k, v in counterfact(m, val, edited=()).items() if k != "n"}
    if "ns_margins" not in result:    # log P(true) - log P(new) on the neighbourhood prompts, unedited
        prompts, targets, kinds = _pairs(val)
        lp = target_logprobs(m, prompts, targets).view(-1, 2).tolist()
        margins = sorted(t - n for (_, kind), (n, t) in zip(kinds, lp) if kind == "ns")
        result["ns_margins"] = {"prompts": len(margins), "below_0": sum(x < 0 for x in margins),
                                "below_1": sum(x < 1 for x in margins), "below_2": sum(x < 2 for x in margins),
                                "median": round(margins[len(margins) // 2], 3)}
        out.write_text(json.dumps(result, indent=1))
    print("unedited", result["unedited"], flush=True)
    moments = {n: second_moments(m, layers, max_tokens=n) for n in (16384, 65536)}
    preserve = preserve_prompts(m)
    names = [n for n in args.only.split(",") if n] if args.only is not None else None
    extra = prompt_moments(m, layers, preserve) if names is None or any("preserve" in n for n in names) else None
    result["preserve"] = {"prompts": len(preserve), "what": "the train facts' prompts, paraphrases and neighbourhood "
                          "prompts, every token; their second moment added to C with C's trace (with_preserved)"}
    run = candidates(m, val, layers, args.batch, moments, extra, preserve, facts_of(m, "train", 10 ** 6))
    names = names if names is not None else [n for n in run if n not in result["candidates"]]
    for name in names:
        print(name, flush=True)
        result["candidates"][name] = run[name]()
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
