"""Tied embeddings on a dispatched model: a device_map that puts the input embedding and the tied unembedding in two
places (here memory and disk, the two places a CPU machine has) gives them one place, and the model equals the
undispatched one: logits, caches at embed / final / logits, the logit lens, and an edit of the shared weight (it reaches
both uses) that undoes bit for bit. Before, a checkpoint loaded with the embedding on disk and lm_head in memory
failed inside accelerate ("weight is on the meta device")."""

import pytest
import torch

import mechanic
from mechanic.locate.project import logit_lens
from mechanic.model.dispatch import DispatchError
from mechanic.steer.plan import Plan, WeightEdit
from mechanic.testing.tiny import left_padded, tiny_model

LENGTHS = [6, 3, 5]
TIED = {"gpt2": {}, "llama": {"tie_word_embeddings": True}}   # gpt2 ties by default; llama only when asked


def split_map(hf, layers: str, embed: str, head: str) -> dict:
    """The input embedding on `embed`, the top-level lm_head on `head`, the last decoder layer on disk (so the model is
    dispatched whatever the two get) and everything else on the CPU."""
    inp = next(n for n, m in hf.named_modules() if m is hf.get_input_embeddings())
    out = {}
    for top, mod in hf.named_children():
        if top == "lm_head":
            out[top] = head
            continue
        for child, sub in mod.named_children():
            path = f"{top}.{child}"
            if path == layers:
                out.update({f"{path}.{i}": "disk" if i == len(sub) - 1 else "cpu" for i in range(len(sub))})
            else:
                out[path] = embed if path == inp else "cpu"
    return out


def shared_name(model) -> str:
    w = model.hf.get_input_embeddings().weight
    return next(n for n, p in model.hf.named_parameters() if p is w)


@pytest.mark.parametrize("how", ["path", "module"])
@pytest.mark.parametrize("places", [("disk", "cpu"), ("cpu", "disk")])
@pytest.mark.parametrize("arch", list(TIED))
def test_tied_embeddings_split_by_the_map_equal_the_undispatched_model(arch, places, how, tmp_path):
    tiny_model(arch, **TIED[arch]).save_pretrained(tmp_path / "ckpt")
    spec = (lambda: str(tmp_path / "ckpt")) if how == "path" else (lambda: tiny_model(arch, **TIED[arch]))
    ref = mechanic.load(spec())          # loaded the same way, undispatched
    assert ref.hf.get_output_embeddings().weight is ref.hf.get_input_embeddings().weight
    with pytest.warns(UserWarning, match=r"tied to .* \(one tensor\)"):
        big = mechanic.load(spec(), device_map=split_map(ref.hf, ref.arch.layers, *places),
                            offload_folder=tmp_path / "offload")
    assert big.hf.hf_device_map["lm_head"] == places[0]          # the unembedding went where the embedding is
    assert big.hf.get_output_embeddings().weight is big.hf.get_input_embeddings().weight

    batch = left_padded(LENGTHS)
    sites = ["embed", "L0.resid_pre", "L1.resid_post", "final", "logits"]
    a, b = ref.run(batch, cache=sites), big.run(batch, cache=sites)
    assert torch.equal(a.logits, b.logits)
    for s in sites:
        assert torch.equal(a[s], b[s]), s
    la, lb = logit_lens(ref, batch, k=3), logit_lens(big, batch, k=3)
    assert torch.equal(la.prob.values, lb.prob.values) and torch.equal(la.rank.values, lb.rank.values)
    assert la.top == lb.top

    before = {n: p.detach().clone() for n, p in big.hf.state_dict().items()}
    width = big.hf.get_input_embeddings().weight.shape[1]

    def edit(m):   # rows 3 and 5 of the shared weight: two tokens' embeddings and their two logits
        return Plan(edits=[WeightEdit(shared_name(m), torch.full((2, width), 0.5), index=([3, 5], None))])
    plain = big.run(batch).logits
    with ref.applied(edit(ref)), big.applied(edit(big)):
        edited = big.run(batch, cache=["embed"])
        assert not torch.equal(edited.logits, plain)
        assert torch.equal(edited.logits, ref.run(batch).logits)       # the edit reached the input and output uses
        assert torch.equal(edited["embed"], ref.run(batch, cache=["embed"])["embed"])
    after = big.hf.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)), k
    assert torch.equal(big.run(batch).logits, plain)
    assert big.fingerprint == ref.fingerprint


def test_a_split_the_map_cannot_mend_says_how_to_fix_it(tmp_path):
    """lm_head placed only through a catch-all key: the map has no lm_head entry to move, so it is refused."""
    hf = tiny_model("gpt2")
    with pytest.raises(DispatchError, match="Give 'lm_head' its own key") as e:
        mechanic.load(hf, device_map={"transformer": "disk", "": "cpu"}, offload_folder=tmp_path / "offload")
    assert "\n" not in str(e.value)


@pytest.mark.real
def test_smollm2_embedding_on_disk_and_lm_head_in_memory_equals_the_undispatched_model(smollm2, tmp_path):
    """SmolLM2 ties its embeddings: the map that failed to load before now loads and equals the default model."""
    assert smollm2.hf.get_output_embeddings().weight is smollm2.hf.get_input_embeddings().weight
    with pytest.warns(UserWarning, match=r"\(one tensor\)"):
        big = mechanic.load("smollm2", device_map=split_map(smollm2.hf, smollm2.arch.layers, "disk", "cpu"),
                            offload_folder=tmp_path / "offload")
    assert big.hf.hf_device_map["lm_head"] == big.hf.hf_device_map["model.embed_tokens"] == "disk"
    prompts = ["The capital of France is", "Water boils at"]
    sites = ["embed", "final"]
    a, b = smollm2.run(prompts, cache=sites), big.run(prompts, cache=sites)
    assert torch.equal(a.logits, b.logits) and all(torch.equal(a[s], b[s]) for s in sites)
    token = smollm2.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]

    def plan(m):   # zero the " Paris" row of the shared weight
        return Plan(edits=[WeightEdit(shared_name(m), torch.zeros(1, m.dims.d_model), index=([token], None))])
    with smollm2.applied(plan(smollm2)), big.applied(plan(big)):
        edited = big.run(prompts).logits
        assert torch.equal(edited, smollm2.run(prompts).logits)
        assert (edited[:, -1, token] == 0).all()           # the zeroed row is also the unembedding of " Paris"
    assert torch.equal(big.run(prompts).logits, b.logits)
