"""Runs inside benchmarks/.venv-saelens: SAELens loads mechanic's files, and writes its own, with encode/decode outputs.

usage: saelens_side.py WORKDIR   (WORKDIR/mechanic/<arch>/ written by compat.py; writes WORKDIR/saelens/<arch>/)
"""

import json
import sys
from importlib import metadata as md
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.transcoder import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, JumpReLUTranscoder,
                                      JumpReLUTranscoderConfig, SkipTranscoder, SkipTranscoderConfig, Transcoder,
                                      TranscoderConfig)

D_IN, D_SAE = 16, 64


def outputs(sae, x):
    with torch.no_grad():
        acts = sae.encode(x)
        return {"acts": acts, "recon": sae.decode(acts), "forward": sae(x)}


def randomise(sae, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.1))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.3)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.2)
    return sae


def made_by_saelens():
    meta = {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny-llama"}
    tmeta = {"hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out", "model_name": "tiny-llama"}
    common = dict(d_in=D_IN, d_sae=D_SAE)
    yield "standard", StandardSAE(StandardSAEConfig(**common, metadata=_m(meta)))
    yield "standard_layer_norm", StandardSAE(StandardSAEConfig(**common, normalize_activations="layer_norm", metadata=_m(meta)))
    yield "standard_no_b_dec_in", StandardSAE(StandardSAEConfig(**common, apply_b_dec_to_input=False, metadata=_m(meta)))
    yield "topk", TopKSAE(TopKSAEConfig(**common, k=8, metadata=_m(meta)))
    yield "topk_rescaled", TopKSAE(TopKSAEConfig(**common, k=8, rescale_acts_by_decoder_norm=True, metadata=_m(meta)))
    yield "jumprelu", JumpReLUSAE(JumpReLUSAEConfig(**common, metadata=_m(meta)))
    yield "gated", GatedSAE(GatedSAEConfig(**common, metadata=_m(meta)))
    tc = dict(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False)
    yield "transcoder", Transcoder(TranscoderConfig(**tc, metadata=_m(tmeta)))
    yield "skip_transcoder", SkipTranscoder(SkipTranscoderConfig(**tc, metadata=_m(tmeta)))
    yield "jumprelu_transcoder", JumpReLUTranscoder(JumpReLUTranscoderConfig(**tc, metadata=_m(tmeta)))
    yield "jumprelu_skip_transcoder", JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(**tc, metadata=_m(tmeta)))
    yield "batchtopk", BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=8, metadata=_m(meta)))


def _m(d):
    from sae_lens.saes.sae import SAEMetadata
    return SAEMetadata(**d)


def main(work: Path):
    x = load_file(str(work / "x.safetensors"))["x"]
    report = {"sae_lens": md.version("sae-lens"), "torch": torch.__version__, "load_mechanic": {}, "saved": []}
    for d in sorted((work / "mechanic").iterdir()):
        try:
            sae = SAE.load_from_disk(d)
            out = outputs(sae, x)
            save_file({k: v.contiguous() for k, v in out.items()}, str(d / "saelens_outputs.safetensors"))
            report["load_mechanic"][d.name] = {"class": type(sae).__name__}
        except Exception as e:  # recorded, not hidden: the comparison reports it
            report["load_mechanic"][d.name] = {"error": f"{type(e).__name__}: {e}"}
    for i, (name, sae) in enumerate(made_by_saelens()):
        randomise(sae, 100 + i)
        out_dir = work / "saelens" / name
        if name == "batchtopk":
            sae.save_inference_model(out_dir)
            sae = SAE.load_from_disk(out_dir)
        else:
            sae.save_model(out_dir)
        save_file({k: v.contiguous() for k, v in outputs(sae, x).items()}, str(out_dir / "saelens_outputs.safetensors"))
        report["saved"].append(name)
    (work / "saelens_side.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
