"""Activation store: exact values, sharding, resume after interruption, per-token rows without padding."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mechanic
from mechanic.model import store as store_mod
from mechanic.model.store import ActivationStore, stream

SITES = ["L0.resid_post", "L1.attn_out", "L0.neuron", "L1.head2.z"]
BS = 3


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, head_dim=16, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    return mechanic.load(AutoModelForCausalLM.from_config(cfg))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 10, (14,), generator=g).tolist()
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]


def left_pad(batch):
    n = max(map(len, batch))
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, n - len(p):] = torch.tensor(p)
        mask[i, n - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def reference(model, prompts, pos, bs=BS):
    """Direct model.run per batch: {site: rows}, plus token/prompt indices when pos is None."""
    out = {s: [] for s in SITES + ["token_index", "prompt_index"]}
    for b in range(0, len(prompts), bs):
        batch = left_pad(prompts[b:b + bs])
        run = model.run(batch, cache=SITES, pos=pos)
        mask = batch["attention_mask"].bool()
        for s in SITES:
            out[s].append(run.cache[s] if pos is not None else run.cache[s][mask])
        if pos is None:
            out["token_index"].append(torch.cat([torch.arange(len(p)) for p in prompts[b:b + bs]]))
            out["prompt_index"].append(torch.cat([torch.full((len(p),), b + i)
                                                  for i, p in enumerate(prompts[b:b + bs])]))
    return {k: torch.cat(v) for k, v in out.items() if v}


def assert_equal(store, ref):
    for k, v in ref.items():
        got = store[k]
        assert got.shape == v.shape, k
        assert got.dtype == v.dtype, k
        assert (got - v).abs().max().item() == 0, k


def test_store_equals_direct_run(model, prompts, tmp_path):
    st = stream(model, prompts, SITES, tmp_path, batch_size=BS, pos=-1)
    m = st.manifest
    assert len(st) == len(prompts) and m["complete"] and m["prompts_done"] == len(prompts)
    assert len(m["shards"]) == 1 and m["sites"] == SITES and m["pos"] == -1
    assert m["shapes"]["L1.head2.z"] == [16] and m["shapes"]["L0.neuron"] == [128]
    assert m["dtype"]["L0.resid_post"] == "float32" and m["model"] == model.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    assert_equal(st, reference(model, prompts, -1))
    assert_equal(ActivationStore(tmp_path), reference(model, prompts, -1))  # reopened from disk
    assert model.hook_count() == 0


def test_list_pos(model, prompts, tmp_path):
    st = stream(model, prompts, SITES, tmp_path, batch_size=BS, pos=[-2, -1])  # every prompt has >= 2 tokens
    assert st.manifest["shapes"]["L0.resid_post"] == [2, 64]
    assert_equal(st, reference(model, prompts, [-2, -1]))


@pytest.mark.parametrize("buffer_mb,shard_mb", [(1e-9, 512), (256, 1e-9)])
def test_many_shards(model, prompts, tmp_path, buffer_mb, shard_mb):
    st = stream(model, prompts, SITES, tmp_path, batch_size=BS, pos=-1, buffer_mb=buffer_mb, shard_mb=shard_mb)
    n_batches = -(-len(prompts) // BS)
    assert len(st.manifest["shards"]) == n_batches
    assert [s["rows"] for s in st.manifest["shards"]] == [min(BS, len(prompts) - b) for b in range(0, len(prompts), BS)]
    ref = reference(model, prompts, -1)
    assert_equal(st, ref)
    blocks = list(st.iter("L0.resid_post", batch_rows=4))  # blocks cross shard boundaries
    assert [len(b) for b in blocks] == [4, 4, 4, 2]
    assert (torch.cat(blocks) - ref["L0.resid_post"]).abs().max().item() == 0


def test_buffer_is_bounded(model, prompts, tmp_path, monkeypatch):
    batch_bytes = BS * (64 + 64 + 128 + 16) * 4
    limit, seen = 2.5 * batch_bytes, []  # flushes after every third batch
    real = store_mod._flush

    def spy(out, man, chunks, shard_mb):
        seen.append((sum(map(store_mod._nbytes, chunks)), max(map(store_mod._nbytes, chunks), default=0)))
        real(out, man, chunks, shard_mb)
    monkeypatch.setattr(store_mod, "_flush", spy)
    st = stream(model, prompts, SITES, tmp_path, batch_size=BS, pos=-1, buffer_mb=limit / store_mod.MB)
    assert len(seen) == 2 and all(total <= limit + batch for total, batch in seen)
    assert [s["rows"] for s in st.manifest["shards"]] == [9, 5]
    assert_equal(st, reference(model, prompts, -1))


def _fail_on(monkeypatch, name, n, effect=None):
    """Make store_mod.<name> raise on its n-th call (after `effect`, e.g. a torn tmp file)."""
    real, calls = getattr(store_mod, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            if effect:
                effect(*args)
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)
    monkeypatch.setattr(store_mod, name, wrapper)


def _torn_write(path, parts):
    path.with_name(path.name + ".tmp").write_bytes(b"\x00" * 37)


@pytest.mark.parametrize("pos", [-1, None])
@pytest.mark.parametrize("crash", ["before_shard", "torn_shard", "before_manifest"])
def test_resume_after_interruption(model, prompts, tmp_path, monkeypatch, pos, crash):
    if crash == "before_shard":
        _fail_on(monkeypatch, "_write_shard", 3)
    elif crash == "torn_shard":
        _fail_on(monkeypatch, "_write_safetensors", 3, _torn_write)
    else:  # shard 2 is on disk but the manifest still lists 2 shards (calls: start, shard 0, shard 1, shard 2)
        _fail_on(monkeypatch, "_save_manifest", 4)
    with pytest.raises(KeyboardInterrupt):
        stream(model, prompts, SITES, tmp_path, batch_size=BS, pos=pos, buffer_mb=1e-9)
    monkeypatch.undo()

    partial = ActivationStore(tmp_path)
    assert partial.manifest["prompts_done"] == 2 * BS and not partial.manifest["complete"]
    assert len(partial.manifest["shards"]) == 2
    ref = reference(model, prompts, pos)
    n_done = 2 * BS if pos is not None else sum(map(len, prompts[:2 * BS]))
    assert len(partial) == n_done
    assert (partial["L0.resid_post"] - ref["L0.resid_post"][:n_done]).abs().max().item() == 0
    finished = {"manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"}
    leftovers = {p.name for p in tmp_path.iterdir()} - finished
    assert leftovers == {"before_shard": set(), "torn_shard": {"shard-00002.safetensors.tmp"},
                         "before_manifest": {"shard-00002.safetensors"}}[crash]

    runs = []
    real_run = model.run
    monkeypatch.setattr(model, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    st = stream(model, prompts, SITES, tmp_path, batch_size=BS, pos=pos, buffer_mb=1e-9)
    assert len(runs) == -(-(len(prompts) - 2 * BS) // BS)  # only the unfinished batches ran
    assert st.manifest["complete"] and len(st) == len(ref["L0.resid_post"])
    batches = [[b, min(b + BS, len(prompts))] for b in range(0, len(prompts), BS)]
    assert [s["prompts"] for s in st.manifest["shards"]] == batches
    assert not list(tmp_path.glob("*.tmp"))
    assert_equal(st, ref)

    runs.clear()  # a finished store: rerunning does nothing
    st = stream(model, prompts, SITES, tmp_path, batch_size=BS, pos=pos, buffer_mb=1e-9)
    assert not runs and st.manifest["complete"]
    assert_equal(st, ref)


def test_per_token_rows_skip_padding(model, prompts, tmp_path):
    st = stream(model, prompts, SITES, tmp_path, batch_size=BS, pos=None, buffer_mb=1e-3)
    assert st.manifest["per_token"] and len(st.manifest["shards"]) > 1
    assert len(st) == sum(map(len, prompts))  # exactly the real tokens, no padding rows
    ref = reference(model, prompts, None)
    assert_equal(st, ref)
    ti, pi = st["token_index"], st["prompt_index"]
    assert ti.dtype == pi.dtype == torch.long
    for i, p in enumerate(prompts):
        assert ti[pi == i].tolist() == list(range(len(p)))
    # each stored token row equals that token's value from a batched run of its own batch
    last = st["L1.attn_out"][torch.tensor([(pi == i).nonzero().max().item() for i in range(len(prompts))])]
    assert (last - reference(model, prompts, -1)["L1.attn_out"]).abs().max().item() == 0


def test_shards_are_plain_safetensors_in_model_dtype(prompts, tmp_path):
    from safetensors.torch import load_file

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, head_dim=16, pad_token_id=0)
    torch.manual_seed(0)
    bf16 = mechanic.load(AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16))
    st = stream(bf16, prompts, SITES, tmp_path, batch_size=BS, pos=None, buffer_mb=1e-3)
    ref = reference(bf16, prompts, None)
    assert st.manifest["dtype"]["L0.resid_post"] == "bfloat16"
    assert_equal(st, ref)
    files = [load_file(tmp_path / s["file"]) for s in st.manifest["shards"]]  # the standard reader agrees
    assert torch.equal(torch.cat([f["L1.attn_out"] for f in files]), ref["L1.attn_out"])
    assert torch.equal(torch.cat([f["prompt_index"] for f in files]), ref["prompt_index"])


def test_changed_arguments_are_refused(model, prompts, tmp_path):
    stream(model, prompts[:4], SITES, tmp_path, batch_size=BS, pos=-1)
    with pytest.raises(ValueError, match="prompts_hash"):
        stream(model, prompts[:5], SITES, tmp_path, batch_size=BS, pos=-1)
    with pytest.raises(ValueError, match="pos"):
        stream(model, prompts[:4], SITES, tmp_path, batch_size=BS, pos=None)
    with pytest.raises(ValueError, match="sites"):
        stream(model, prompts[:4], SITES[:1], tmp_path, batch_size=BS, pos=-1)
    assert json.loads((tmp_path / "manifest.json").read_text())["rows"] == 4


def test_bad_inputs(model, tmp_path):
    with pytest.raises(ValueError, match="Empty prompt"):
        stream(model, [[5, 6], []], SITES, tmp_path)
    with pytest.raises(TypeError, match="pos"):
        stream(model, [[5, 6]], SITES, tmp_path, pos=slice(0, 2))
    with pytest.raises(ValueError, match="tokenizer"):
        stream(model, ["hello"], SITES, tmp_path)
