"""Runs inside benchmarks/.venv-saelens: SAELens trains a TopK SAE, timed per step, for sae_throughput.py.

usage: throughput_side.py --model DIR --work W --mode e2e|steps [settings as in sae_throughput.py]

e2e:   SAELens's own LanguageModelSAETrainingRunner pieces (model via its AutoModelForCausalLM wrapper,
       ActivationsStore on the token ids in W/train_ids.safetensors, SAETrainer), hook model.layers.{L}.
steps: the same SAETrainer fed batches of the pre-computed activations in W/step_acts.safetensors (SAE step only).
Saves the trained SAE (inference form) to W/saelens_<mode>/ and prints one JSON line: per-step end times,
peak RSS, versions, and whether TransformerLens's HookedTransformer can load the model at all.
"""

import argparse
import json
import math
import resource
import time
from importlib import metadata as md
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM of its address space (ru_maxrss would also count the parent's RSS
    at fork, which Linux carries across exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def hooked_transformer_status(model_dir: str) -> str:
    """Why TransformerLens's HookedTransformer cannot load this model (or 'loads')."""
    from transformers import AutoModelForCausalLM
    from transformer_lens import HookedTransformer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", model_dir):
        try:
            HookedTransformer.from_pretrained_no_processing(name, hf_model=hf, device="cpu")
            return f"loads as {name}"
        except Exception as e:  # recorded for the report
            last = f"{type(e).__name__}: {str(e).split('. Valid official model names')[0]}"
    return last


@torch.no_grad()
def heldout_metrics(sae_dir: Path, acts_file: Path) -> dict:
    """FVU and L0 of the saved SAE, loaded back by SAELens itself, on the held-out activations."""
    from sae_lens import SAE

    x = load_file(str(acts_file))["x"]
    sae = SAE.load_from_disk(str(sae_dir))
    acts = sae.encode(x)
    err = float((sae.decode(acts) - x).pow(2).sum())
    return {"fvu": err / float((x - x.mean(0)).pow(2).sum()), "l0": float((acts != 0).sum(-1).float().mean())}


def configs(a, steps: int):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    sae_cfg = TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, dtype="float32", device="cpu",
                                    normalize_activations="expected_average_only_in")
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=a.model, model_class_name="AutoModelForCausalLM", hook_name=f"model.layers.{a.layer}",
        dataset_path="token ids from sae_throughput.py", is_dataset_tokenized=True, streaming=False,
        context_size=a.seq_len, seqpos_slice=(1, None), prepend_bos=False, training_tokens=a.tokens,
        train_batch_size_tokens=a.batch_size, store_batch_size_prompts=a.forward_batch,
        n_batches_in_buffer=math.ceil(a.buffer_tokens / (a.seq_len - 1)), activations_mixing_fraction=0.5,
        lr=a.lr, lr_scheduler_name="constant", lr_warm_up_steps=max(1, steps // 100),
        lr_decay_steps=steps - int(steps * 0.8), adam_beta1=0.9, adam_beta2=0.999,
        n_batches_for_norm_estimate=1, logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None,
        output_path=None, device="cpu", dtype="float32", seed=a.seed, verbose=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--mode", choices=("e2e", "steps"), default="e2e")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--buffer-tokens", type=int, default=32768)
    p.add_argument("--forward-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check-hooked-transformer", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    work = Path(a.work)
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = a.tokens // a.batch_size
    cfg = configs(a, steps)
    t_setup = time.perf_counter()
    if a.mode == "e2e":
        import datasets
        from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

        ids = load_file(str(work / "train_ids.safetensors"))["ids"]
        ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
        runner = LanguageModelSAETrainingRunner(cfg, override_dataset=ds)
        assert next(runner.model.parameters()).dtype == torch.float32
        sae, provider = runner.sae, runner.activations_store
    else:
        acts = load_file(str(work / "step_acts.safetensors"))["x"]
        perm = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(a.seed))
        acts = acts[perm]
        n_batches = acts.shape[0] // a.batch_size

        def batches():
            i = 0
            while True:   # cycles (the norm estimate takes one batch first)
                yield acts[(i % n_batches) * a.batch_size:(i % n_batches + 1) * a.batch_size]
                i += 1
        sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
        provider = batches()
    trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=provider, evaluator=None)
    ends: list[float] = []
    inner = trainer.step

    def timed(batch):
        out = inner(batch)
        ends.append(time.perf_counter())
        return out
    trainer.step = timed
    t_fit, c_fit = time.perf_counter(), time.process_time()
    trained = trainer.fit()
    t_end, c_end = time.perf_counter(), time.process_time()
    out_dir = work / f"saelens_{a.mode}"
    trained.save_inference_model(str(out_dir))
    rss_mb = peak_rss_mb()   # before the checks below
    result = {"peer": "sae_lens", "version": md.version("sae-lens"), "transformer_lens": md.version("transformer-lens"),
              "transformers": md.version("transformers"), "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "mode": a.mode, "tokens": trainer.n_training_samples, "batch_size": a.batch_size,
              "step_ends": [t - t_fit for t in ends], "setup_s": t_fit - t_setup, "fit_s": t_end - t_fit,
              "fit_cpu_s": c_end - c_fit, "process_s": t_end - T0, "peak_rss_mb": rss_mb,
              "dictionary_dir": str(out_dir), "sae_class": type(trained).__name__,
              "settings": {"hook_name": cfg.hook_name, "model_class_name": cfg.model_class_name,
                           "n_batches_in_buffer": cfg.n_batches_in_buffer, "lr_warm_up_steps": cfg.lr_warm_up_steps,
                           "lr_decay_steps": cfg.lr_decay_steps, "seqpos_slice": list(cfg.seqpos_slice),
                           "normalize_activations": "expected_average_only_in (1 batch)",
                           "rescale_acts_by_decoder_norm": cfg.sae.rescale_acts_by_decoder_norm,
                           "aux_loss_coefficient": cfg.sae.aux_loss_coefficient,
                           "decoder_init_norm": cfg.sae.decoder_init_norm}}
    result["heldout_by_saelens"] = heldout_metrics(out_dir, work / "heldout_acts.safetensors")
    if a.check_hooked_transformer:
        result["hooked_transformer"] = hooked_transformer_status(a.model)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
