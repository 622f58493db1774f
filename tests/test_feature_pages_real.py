"""Feature pages on the real default model: a small TopK SAE trained on SmolLM2 for a few thousand tokens, pages
for its most frequent features (contexts that are the held-out text as written, the logit effect through the tied
unembedding computed by hand, a page with every feature)."""

import json

import pytest

from mechanic.data.text import calibration, heldout
from mechanic.features.train import DictConfig, train
from mechanic.locate.feature_pages import feature_pages
from mechanic.report.feature_pages import build_page


@pytest.mark.real
def test_feature_pages_on_smollm2(smollm2, tmp_path):
    (d,) = train(smollm2, DictConfig("L3.resid_post", "topk", expansion=2, k=16, lr=2e-3), tmp_path / "sae",
                 tokens=4096, text=calibration(), batch_size=512, buffer_tokens=2048, seq_len=128, progress=False)
    text = heldout()
    data = feature_pages(smollm2, d, text=text, features=4, tokens=2048, contexts=5, logits=8)
    json.dumps(data, allow_nan=False)
    assert len(data["features"]) == 4 and data["tokens"] == 16 * 127
    joined = "\n\n".join(text)
    hf = smollm2.hf
    for f in data["features"]:
        assert f["count"] > 0 and len(f["contexts"]) == 5
        for c in f["contexts"]:
            assert "".join(c["tokens"]).strip("\ufffd") in joined
            assert c["acts"][c["at"]] == c["value"] <= f["max"]
        row = d.W_dec.detach()[f["id"]] * hf.model.norm.weight.detach()
        effect = row @ hf.get_output_embeddings().weight.detach().T
        got = {t["id"]: t["logit"] for side in ("promoted", "suppressed") for t in f["logits"][side]}
        assert [t["id"] for t in f["logits"]["promoted"]] == effect.topk(8).indices.tolist()
        assert max(abs(v - float(effect[i])) for i, v in got.items()) < 1e-4
    html = build_page(data, tmp_path / "features.html").read_text(encoding="utf-8")
    assert all(f'id="feature-{f["id"]}"' in html for f in data["features"])
