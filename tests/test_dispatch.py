"""Big models: a model dispatched with disk offload equals the undispatched one exactly (logits, every cached site,
interventions, gradients, generate), weight edits reach offloaded weights and undo bit for bit, checkpoints on disk
are never written, and bad placement options fail with one clear paragraph."""

import hashlib

import pytest
import torch

import mechanic
from mechanic.model.dispatch import DispatchError
from mechanic.model.interventions import Intervention
from mechanic.steer.plan import Orthogonalize, Plan, WeightEdit
from mechanic.testing.tiny import CONFIGS, left_padded, tiny_model

ARCHS = list(CONFIGS)
LENGTHS = [6, 3, 5]


def disk_map(hf, layers: str) -> dict:
    """Everything on the CPU except decoder layers 1.. and the top-level output modules (lm_head), which go to disk."""
    out = {}
    for top, mod in hf.named_children():
        if not layers.startswith(top + "."):
            out[top] = "disk"
            continue
        for child, sub in mod.named_children():
            path = f"{top}.{child}"
            if path == layers:
                out.update({f"{path}.{i}": "cpu" if i == 0 else "disk" for i in range(len(sub))})
            else:
                out[path] = "cpu"
    return out


def pair(arch, tmp_path, how="path"):
    """(undispatched, dispatched with disk offload) models of the same tiny weights, loaded the same way: from a
    saved directory through from_pretrained, or from a built module through accelerate's dispatch_model."""
    if how == "path":
        tiny_model(arch).save_pretrained(tmp_path / "ckpt")
        ref = mechanic.load(str(tmp_path / "ckpt"))
        spec = str(tmp_path / "ckpt")
    else:
        ref, spec = mechanic.load(tiny_model(arch)), tiny_model(arch)
    return ref, mechanic.load(spec, device_map=disk_map(ref.hf, ref.arch.layers), offload_folder=tmp_path / "offload")


def sites(model) -> list[str]:
    names = [str(s) for s in model.sites()] + ["L0.head1.z", "L2.head1.q"]
    return [s for s in names if not s.endswith(("expert", "router"))] + \
        (["L2.expert", "L2.router"] if model.is_moe(2) else ["L2.neuron"])


def mapped_files(tensor) -> set[str]:
    """The files whose memory maps hold `tensor`'s storage (empty for ordinary memory)."""
    ptr = tensor.untyped_storage().data_ptr()
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi and len(parts) > 5:
                out.add(parts[5])
    return out


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["path", "module"])
@pytest.mark.parametrize("arch", ARCHS)
def test_disk_offloaded_model_equals_undispatched_exactly(arch, how, tmp_path):
    ref, big = pair(arch, tmp_path, how)
    assert "disk" in big.hf.hf_device_map.values()
    assert not [n for n, p in big.hf.named_parameters() if p.device.type == "meta"]
    down = big.layer_module(2, big.arch.o_proj)
    assert mapped_files(big.arch.o_weight(down)), "a disk-offloaded weight should be a memory map, not a copy"
    batch = left_padded(LENGTHS)
    a, b = ref.run(batch, cache=sites(ref)), big.run(batch, cache=sites(big))
    assert torch.equal(a.logits, b.logits)
    assert a.cache.keys() == b.cache.keys()
    for k in a.cache:
        assert torch.equal(a[k], b[k]), k
    assert big.fingerprint == ref.fingerprint


@pytest.mark.parametrize("arch", ARCHS)
def test_interventions_gradients_and_generate_on_offloaded_model(arch, tmp_path):
    ref, big = pair(arch, tmp_path)
    batch = left_padded(LENGTHS)
    ivs = [Intervention("L1.resid_post", "scale", 0.5, pos=-1), Intervention("L2.head0", "replace", 0.0)]
    assert torch.equal(ref.run(batch, interventions=ivs).logits, big.run(batch, interventions=ivs).logits)
    metric = lambda logits: logits[:, -1].logsumexp(-1).sum()  # noqa: E731
    ga = ref.run(batch, cache=["L0.resid_post", "L2.attn_out"], grad=metric)
    gb = big.run(batch, cache=["L0.resid_post", "L2.attn_out"], grad=metric)
    for k in ga.grads:
        assert torch.equal(ga.grads[k], gb.grads[k]), k
    assert all(not p.requires_grad or p.grad is None for p in big.hf.parameters())
    steer = [Intervention("L1.resid_post", "add", 0.3)]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(batch, steer, **kw), big.generate(batch, steer, **kw))


def _edits(model) -> list:
    """A slice edit of an offloaded o_proj, an orthogonalization of the offloaded lm_head (tied to the embedding
    on the CPU in gpt2 and gemma), and a down_proj column edit (an expert's down_proj in MoE layers)."""
    o = f"{model.arch.layers}.2.{model.arch.o_proj}.weight"
    w = dict(model.hf.named_parameters())[o]
    edits = [WeightEdit(o, torch.full((w.shape[0], 2), 0.25), index=(None, [1, 5]))]
    unembed = model.module(model.arch.unembed).weight   # tied models list it under the embedding's name
    head = next(n for n, p in model.hf.named_parameters() if p is unembed)
    edits.append(Orthogonalize(head, torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0)),
                               dim=1))
    if model.is_moe(2):   # one expert's down projection, fused into one [experts, ...] parameter
        name = f"{model.arch.layers}.2.{model.arch.experts}.down_proj"
        shape = dict(model.hf.named_parameters())[name].shape
        edits.append(WeightEdit(name, torch.full((1, *shape[1:]), 0.01), index=([1], None, None)))
    else:
        from mechanic.steer.edit import neuron_edit

        edits += neuron_edit(model, ["L2.neuron3", "L2.neuron7"], factor=3.0).edits
    return edits


def _state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.hf.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_edits_reach_offloaded_weights_and_undo_bit_for_bit(arch, tmp_path):
    ref, big = pair(arch, tmp_path)
    on_disk = digest(tmp_path / "ckpt") | digest(tmp_path / "offload")
    before = _state(big)
    batch = left_padded(LENGTHS)
    plain = big.run(batch).logits
    plan_ref, plan_big = Plan(edits=_edits(ref)), Plan(edits=_edits(big))
    with ref.applied(plan_ref), big.applied(plan_big):
        edited = big.run(batch).logits
        assert not torch.equal(edited, plain)               # the edit reached the offloaded weights...
        assert torch.equal(edited, ref.run(batch).logits)   # ...exactly as on the undispatched model
    after = _state(big)
    assert before.keys() == after.keys()
    for k in before:   # bit for bit: compare the raw bytes, so -0.0 vs 0.0 or NaN payloads would show
        assert torch.equal(before[k].view(torch.uint8) if before[k].dim() else before[k],
                           after[k].view(torch.uint8) if after[k].dim() else after[k]), k
    assert torch.equal(big.run(batch).logits, plain)
    assert digest(tmp_path / "ckpt") | digest(tmp_path / "offload") == on_disk   # copy-on-write: files untouched


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_on_offloaded_model_equals_undispatched_and_undoes(arch, word_tokenizer, tmp_path, monkeypatch):
    from mechanic.steer.edit import Fact, rome

    monkeypatch.setenv("MECHANIC_CACHE", str(tmp_path / "cache"))
    n = len(word_tokenizer)
    tiny_model(arch, vocab_size=n).save_pretrained(tmp_path / "ckpt")
    ref = mechanic.load(str(tmp_path / "ckpt"), tokenizer=word_tokenizer)
    big = mechanic.load(str(tmp_path / "ckpt"), device_map=disk_map(ref.hf, ref.arch.layers),
                        offload_folder=tmp_path / "offload", tokenizer=word_tokenizer)
    fact = Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome", " Paris")
    kw = dict(layer=1, prefixes=["", "I think so. "], steps=3, stats_tokens=1000)
    p_ref, p_big = rome(ref, fact, **kw), rome(big, fact, **kw)
    assert torch.equal(p_ref.edits[0].value, p_big.edits[0].value)
    before = _state(big)
    prompt = [fact.prompt]
    with ref.applied(p_ref), big.applied(p_big):
        assert torch.equal(ref.run(prompt).logits, big.run(prompt).logits)
    after = _state(big)
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)


def test_balanced_strategy_with_max_memory_offloads_the_rest(tmp_path):
    ref = mechanic.load(tiny_model("llama"))
    tiny_model("llama").save_pretrained(tmp_path / "ckpt")
    size = sum(p.numel() * p.element_size() for p in ref.hf.parameters())
    for strategy in ("auto", "balanced", "sequential"):
        big = mechanic.load(str(tmp_path / "ckpt"), device_map=strategy, max_memory={"cpu": size // 2},
                            offload_folder=tmp_path / strategy)
        places = set(big.hf.hf_device_map.values())
        assert places == {"cpu", "disk"}, (strategy, big.hf.hf_device_map)
        batch = left_padded(LENGTHS)
        assert torch.equal(big.run(batch).logits, ref.run(batch).logits)


def test_home_hook_moves_home_values_and_keeps_the_parameter(tmp_path):
    """The path for an execution device other than the CPU (tested with the CPU standing in for it)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from mechanic.model.resident import HomeHook

    ref, big = pair("llama", tmp_path)
    mod = big.layer_module(2, big.arch.down_proj)
    home = mod.weight
    inner = AlignDevicesHook(execution_device="cpu", offload=True, weights_map={})
    add_hook_to_module(mod, HomeHook(inner, {"weight": home}))
    batch = left_padded(LENGTHS)
    assert torch.equal(big.run(batch).logits, ref.run(batch).logits)
    assert mod.weight is home
    with torch.no_grad():
        home[:, 0] = 0.0                     # an edit between forwards is what the next forward uses
        ref.layer_module(2, ref.arch.down_proj).weight[:, 0] = 0.0
    assert torch.equal(big.run(batch).logits, ref.run(batch).logits)


def test_bad_placement_options_say_what_works(tmp_path):
    tiny = tiny_model("llama")
    cases = [
        (dict(device_map="everywhere"), "not a placement strategy"),
        (dict(device_map=["model.layers.0"]), "must be a strategy name"),
        (dict(device_map={"model.layerz.0": "cpu", "": "cpu"}), "does not have"),
        (dict(device_map={"": "gpu7"}), "not a device name"),
        (dict(device_map={"": "cuda:3"} if not torch.cuda.is_available() else {"": "cuda:99"}), "this machine has"),
        (dict(device_map={"model": "cpu"}), "without a device"),
        (dict(device_map={"": "disk"}), "no offload_folder"),
        (dict(max_memory={"cpu": "1GiB"}), "only apply to a dispatched model"),
        (dict(device_map="auto", device="cpu"), "not both"),
        (dict(device_map={"": "cpu"}, max_memory={"cpu": 1}), "Drop one"),
        (dict(dtype=torch.int8), "not a dtype"),
        (dict(dtype="float8"), "not a dtype"),
    ]
    for kwargs, match in cases:
        with pytest.raises(DispatchError, match=match) as e:
            mechanic.load(tiny, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(DispatchError, match="not a dtype"):   # refused before any GGUF conversion starts
        mechanic.load(str(tmp_path / "model.gguf"), dtype="int4")


def test_offloaded_model_saves_and_reloads_equal(tmp_path):
    ref, big = pair("gpt2", tmp_path)   # tied embeddings, lm_head on disk
    with pytest.warns(UserWarning, match="offloaded modules"):   # transformers' note; the weights are resident
        big.save(tmp_path / "saved")
    again = mechanic.load(str(tmp_path / "saved"))
    batch = left_padded(LENGTHS)
    assert torch.equal(again.run(batch).logits, ref.run(batch).logits)
    assert again.hf.lm_head.weight is again.hf.transformer.wte.weight


def test_cpu_offloaded_weights_become_the_tensors_accelerate_holds():
    """accelerate's cpu_offload keeps values in an in-memory weights map: settle makes those tensors the parameters."""
    from accelerate import cpu_offload

    from mechanic.model.dispatch import settle

    ref, hf = mechanic.load(tiny_model("qwen3")), tiny_model("qwen3")
    cpu_offload(hf, execution_device="cpu")
    assert any(p.device.type == "meta" for p in hf.parameters())
    big = mechanic.load(settle(hf, None))
    batch = left_padded(LENGTHS)
    assert torch.equal(big.run(batch).logits, ref.run(batch).logits)
    plan = Plan(edits=_edits(big))
    with big.applied(plan), ref.applied(Plan(edits=_edits(ref))):
        assert torch.equal(big.run(batch).logits, ref.run(batch).logits)
    assert torch.equal(big.run(batch).logits, ref.run(batch).logits)


def test_cache_device_moves_cached_values_and_gradients():
    """cache_device routes every cached value (and gradient) to the named device; a bad name is a clear error."""
    m = mechanic.load(tiny_model("llama"))
    x = torch.randint(3, 100, (2, 5))
    sites = ["L0.resid_post", "L1.head0.z", "L2.neuron"]
    plain = m.run(x, cache=sites)
    moved = m.run(x, cache=sites, cache_device="meta")     # the one other device on a CPU-only machine
    assert {v.device.type for v in moved.cache.values()} == {"meta"}
    assert all(moved.cache[s].shape == plain.cache[s].shape for s in sites)
    assert torch.equal(moved.logits, plain.logits)
    g = m.run(x, cache=sites, grad=lambda lg: lg[:, -1, 5].sum(), cache_device="meta")
    assert {v.device.type for v in g.grads.values()} == {"meta"} and len(g.grads) == len(sites)
    with pytest.raises(ValueError, match="not a device"):
        m.run(x, cache=sites, cache_device="gpu7")
