"""Feature pages: streaming top-k contexts, counts and histograms equal a naive pass that keeps every activation;
the logit effect equals W_U · (norm gain * decoder row) computed by hand; the CLI writes the page."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import mechanic
from mechanic.cli import app
from mechanic.data.text import heldout
from mechanic.features import Dictionary, save
from mechanic.features.activations import SiteReader, text_windows
from mechanic.features.contexts import BINS, first_top, scan
from mechanic.locate.feature_logits import logit_effect
from mechanic.locate.feature_pages import feature_pages, token_pieces
from mechanic.testing.tiny import tiny_model

runner = CliRunner()


def random_dictionary(d_in: int, d_sae: int = 48, site: str = "L1.resid_post", k: int = 6, seed: int = 0,
                      **kw) -> Dictionary:
    """A TopK dictionary with random weights (every latent fires on some tokens)."""
    d = Dictionary(d_in, d_sae, "topk", k=k, site=site, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.W_enc.copy_(torch.randn(d.d_in, d_sae, generator=g))
        d.W_dec.copy_(torch.randn(d_sae, d.d_out, generator=g))
        d.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
    return d


@pytest.fixture(scope="module")
def tiny_word(word_tokenizer):
    m = mechanic.load(tiny_model("llama", vocab_size=word_tokenizer.vocab_size))
    m.tokenizer = word_tokenizer
    return m


@torch.no_grad()
def naive(model, d, text, tokens, k, seq_len, batch, before, after, skip=1):
    """Every activation of every window kept, then sorted: (value desc, place asc) top-k, counts, max, histogram."""
    wins = []
    for w in text_windows(model, text, "heldout", seq_len):
        wins.append(w)
        if len(wins) * seq_len >= tokens:
            break
    ids = torch.stack(wins)
    reader = SiteReader(model, [d.site], skip_first=skip)
    acts = torch.cat([d.encode(reader.read(ids[i:i + batch])[d.site]).view(len(ids[i:i + batch]), seq_len - skip, -1)
                      for i in range(0, len(ids), batch)])                     # [R, S - skip, d_sae]
    out = {}
    for f in range(d.d_sae):
        a = acts[..., f]
        cells = sorted(((float(a[r, t]), r * seq_len + t + skip) for r in range(a.shape[0]) for t in range(a.shape[1])
                        if a[r, t] > 0), key=lambda c: (-c[0], c[1]))
        ctx = []
        for v, p in cells[:k]:
            r, t = divmod(p, seq_len)
            span = range(max(0, t - before), min(seq_len, t + after + 1))
            ctx.append((v, p, [int(ids[r, s]) for s in span],
                        [float(a[r, s - skip]) if s >= skip else math.nan for s in span], t - span.start))
        m = float(a.max().clamp_min(0))
        w = 2.0 ** -60
        while BINS * w <= m:
            w *= 2
        hist = [0] * BINS
        for v, _ in cells:
            hist[int(v // w)] += 1
        out[f] = {"contexts": ctx, "count": len(cells), "max": m, "hist": hist if cells else [0] * BINS,
                  "width": w if cells else 0.0}
    return out, acts.shape[0] * acts.shape[1]


def same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


@pytest.mark.parametrize("text,kind", [("prose", "sae"), ("repeated", "sae"), ("prose", "transcoder")])
def test_streaming_top_contexts_equal_the_naive_sort(tiny_word, text, kind):
    """Random dictionary on a tiny model; "repeated" gives 25 equal windows of token ids, so values tie exactly;
    the transcoder reads the MLP input (a captured call, not an engine site)."""
    one = tiny_word.tokenizer(heldout()[0], add_special_tokens=False)["input_ids"][:48]
    passages = heldout()[:12] if text == "prose" else torch.tensor(one * 25)
    d = random_dictionary(64) if kind == "sae" else random_dictionary(64, site="L1.mlp_in", out_site="L1.mlp_out")
    kw = dict(tokens=1200, k=5, seq_len=48, batch=3, before=6, after=3)
    want, n_tokens = naive(tiny_word, d, passages, **kw)
    got = scan(tiny_word, d, passages, None, **kw)
    assert got.tokens == n_tokens and got.windows == math.ceil(1200 / 48)
    ties = 0
    for i in range(d.d_sae):
        w = want[i]
        assert int(got.count[i]) == w["count"] and float(got.max[i]) == w["max"]
        assert got.hist[i].tolist() == w["hist"] and float(got.width[i]) == w["width"]
        ctx = got.contexts(i)
        assert [c[:3] for c in ctx] == [c[:3] for c in w["contexts"]], i
        assert [c[4] for c in ctx] == [c[4] for c in w["contexts"]]
        assert all(same(a[3], b[3]) for a, b in zip(ctx, w["contexts"]))
        values = [c[0] for c in w["contexts"]]
        ties += len(values) - len(set(values))
    assert sum(w["count"] for w in want.values()) == n_tokens * 6           # k = 6 latents fire per token
    if text == "repeated":
        assert ties > 0                                                       # the tie-break was exercised


def test_batch_top_k_keeps_the_earliest_of_tied_values():
    """torch.topk picks any of several equal values; first_top must pick the earliest rows, like a stable sort."""
    g = torch.Generator().manual_seed(0)
    flat = torch.randint(1, 4, (1000, 50), generator=g).float()
    flat[:, :10] = torch.randint(0, 2, (1000, 10), generator=g).float() * torch.rand(1000, 10, generator=g)
    val, idx = first_top(flat, 5)
    want = torch.argsort(flat, dim=0, descending=True, stable=True)[:5]
    assert torch.equal(idx, want) and torch.equal(val, flat.gather(0, want))
    assert not torch.equal(flat.topk(5, dim=0).indices, want)               # topk alone would get it wrong


def test_listed_features_equal_the_same_rows_of_a_full_scan(tiny_word):
    d = random_dictionary(64)
    kw = dict(tokens=600, k=4, seq_len=40, batch=2)
    full = scan(tiny_word, d, heldout()[:8], None, **kw)
    part = scan(tiny_word, d, heldout()[:8], [7, 3, 40], **kw)
    for j, f in enumerate([7, 3, 40]):
        assert part.contexts(j) == full.contexts(f) or all(
            a[:3] == b[:3] and same(a[3], b[3]) for a, b in zip(part.contexts(j), full.contexts(f)))
        assert torch.equal(part.hist[j], full.hist[f]) and part.count[j] == full.count[f]


@pytest.mark.parametrize("arch,site", [("llama", "L1.resid_post"), ("llama", "L2.head.z"), ("llama", "L1.neuron"),
                                       ("gemma", "L1.mlp_out"), ("gpt2", "L0.resid_post"), ("llama", "L1.mlp_in")])
def test_logit_effect_equals_the_hand_computation(arch, site):
    """W_U · (gain * row): Llama's RMSNorm weight, Gemma's 1 + weight, GPT-2's centred LayerNorm; z and neuron
    rows go through o_proj / down_proj first."""
    hf = tiny_model(arch)
    m = mechanic.load(hf)
    width = {"head.z": 64, "neuron": 96}.get(site.split(".", 1)[1], 64)
    out = {"L1.mlp_in": "L1.mlp_out"}.get(site)                     # a transcoder's row lives at its output
    d = random_dictionary(width, site=site, out_site=out)
    feats = [0, 5, 17]
    got = logit_effect(m, d, feats, k=7)
    layer = int(site[1])
    rows = d.W_dec.detach()[feats]
    if site.endswith("head.z"):
        rows = rows @ hf.model.layers[layer].self_attn.o_proj.weight.T
    if site.endswith("neuron"):
        rows = rows @ hf.model.layers[layer].mlp.down_proj.weight.T
    if arch == "gpt2":
        ln, W_U = hf.transformer.ln_f, hf.lm_head.weight
        rows = (rows - rows.mean(-1, keepdim=True)) * ln.weight
    else:
        norm, W_U = hf.model.norm, hf.lm_head.weight
        rows = rows * ((1 + norm.weight) if arch == "gemma" else norm.weight)
    effect = (rows @ W_U.T).detach()
    for j in range(len(feats)):
        up, down = effect[j].topk(7), effect[j].topk(7, largest=False)
        assert [i for i, _ in got[j]["promoted"]] == up.indices.tolist()
        assert [i for i, _ in got[j]["suppressed"]] == down.indices.tolist()
        diff = max(abs(v - float(effect[j, i])) for side in ("promoted", "suppressed") for i, v in got[j][side])
        assert diff < 1e-5, diff


def test_token_pieces_join_to_the_decoded_text(word_tokenizer):
    text = "emoji 🧪🔬 👩‍🔬 and עברית\n\n<script>x</script> &amp;"
    ids = word_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(word_tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == word_tokenizer.decode(ids) == text
    assert "" in pieces                                     # an emoji split over byte tokens


def test_page_data_is_json_and_orders_by_frequency(tiny_word):
    d = random_dictionary(64)
    data = feature_pages(tiny_word, d, text=heldout()[:8], features=5, tokens=600, contexts=3, logits=4, seq_len=40)
    json.dumps(data, allow_nan=False)
    freq = [f["frequency"] for f in data["features"]]
    assert len(freq) == 5 and freq == sorted(freq, reverse=True)
    full = scan(tiny_word, d, heldout()[:8], None, tokens=600, k=3, seq_len=40)
    assert freq[0] == float(full.count.max()) / full.tokens
    for f in data["features"]:
        assert sum(f["histogram"]["counts"]) == f["count"] and len(f["contexts"]) == 3
        assert all(c["acts"][c["at"]] == c["value"] for c in f["contexts"])
        assert len(f["logits"]["promoted"]) == 4


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, word_tokenizer):
    root = tmp_path_factory.mktemp("features")
    tiny_model("llama", vocab_size=word_tokenizer.vocab_size).save_pretrained(root / "model")
    word_tokenizer.save_pretrained(root / "model")
    save(random_dictionary(64, site="L2.resid_post"), root / "sae")
    (root / "held.txt").write_text("\n\n".join(heldout()[:10]))
    return root


def test_cli_writes_the_page_and_json(cli_files, tmp_path):
    out = tmp_path / "pages" / "features.html"
    args = ["features", str(cli_files / "sae"), "--model", str(cli_files / "model"), "--text",
            str(cli_files / "held.txt"), "--tokens", "512", "--seq-len", "64", "--contexts", "4", "-o", str(out)]
    res = runner.invoke(app, args + ["--features", "3,11,2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["page"] == str(out) and [f["id"] for f in data["features"]] == [3, 11, 2]
    html = out.read_text(encoding="utf-8")
    assert all(f'id="feature-{f}"' in html for f in (3, 11, 2))
    assert "http://" not in html.split("<script>")[0] and "<script src" not in html
    res = runner.invoke(app, args + ["--features", "top:4"])
    assert res.exit_code == 0, res.output
    assert "4 features" in res.output and html != out.read_text(encoding="utf-8")


@pytest.mark.parametrize("extra,message", [(["--features", "3,x"], "comma-separated latent ids"),
                                           (["--features", "3,999"], "must be in 0..47"),
                                           (["--features", "3,3"], "listed twice"),
                                           (["--features", "top:0"], "at least one feature"),
                                           (["--seq-len", "1000000"], "no window of 1000000 tokens")])
def test_cli_user_errors_are_one_paragraph(cli_files, tmp_path, extra, message):
    res = runner.invoke(app, ["features", str(cli_files / "sae"), "--model", str(cli_files / "model"), "--text",
                              str(cli_files / "held.txt"), "--tokens", "256", "-o", str(tmp_path / "f.html")] + extra)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "f.html").exists()


def test_cli_missing_dictionary_is_one_paragraph(tmp_path):
    res = runner.invoke(app, ["features", str(tmp_path / "nothing"), "-o", str(tmp_path / "f.html")])
    assert res.exit_code == 2 and "Traceback" not in res.output
