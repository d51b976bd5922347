"""Training throughput (images/s) of stage 1 and stage 2, and sampling throughput of each
generator, for SelfBootTok (global tokens only) beside the baseline (all tokens) at one preset.
bf16 autocast on GPU, as the trainers use. Usage:
    python bench/throughput.py --device cuda --preset b64 --batch 64
"""

from __future__ import annotations

import argparse

import torch
from _common import RESULTS, machine_name, timed, write_results

from selfboottok import SelfBootTok, SelfBootTokConfig
from selfboottok.training.losses import stage1_losses, stage2_losses
from selfboottok.training.stages import stage1_parameters, stage2_parameters


def _train_step(model, params, loss_fn, autocast):
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        with autocast:
            loss = loss_fn()["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(config, batch, device, repeats, sample_steps):
    model = SelfBootTok(config).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = (torch.rand(batch, 3, config.image_size, config.image_size, generator=gen) * 2 - 1).to(device)
    labels = torch.randint(0, config.num_classes, (batch,), generator=gen).to(device)
    row = {}
    model.train()
    # the first call initialises the VQ codebook from the batch, then the timed steps run
    step1 = _train_step(model, stage1_parameters(model), lambda: stage1_losses(model, images), autocast)
    t, _ = timed(step1, repeats, sync, warmup=2)
    row["stage1_img_s"] = batch / t
    for p in model.tokenizer.encoder.parameters():
        p.requires_grad_(False)
    step2 = _train_step(model, stage2_parameters(model), lambda: stage2_losses(model, images, labels), autocast)
    t, _ = timed(step2, repeats, sync, warmup=2)
    row["stage2_img_s"] = batch / t
    model.eval()
    for kind in config.generators:
        def sample():
            with torch.no_grad(), autocast:
                return model.generate(labels, steps=sample_steps, generator=kind, seed=0)
        t, _ = timed(sample, repeats, sync, warmup=1)
        row[f"sample_{kind}_img_s"] = batch / t
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="default: b64 on cuda, tiny on cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 16 on cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sample-steps", type=int, default=8, help="MaskGIT decoding steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    preset = args.preset or ("b64" if cuda else "tiny")
    batch = args.batch or (64 if cuda else 16)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = {}
    for mode in ("global", "all"):
        config = SelfBootTokConfig.preset(preset, generators=["maskgit", "ar"], generator_tokens=mode)
        rows[mode] = measure(config, batch, args.device, args.repeats, args.sample_steps)
        print(mode, {k: round(v, 2) for k, v in rows[mode].items()}, flush=True)
    machine = machine_name(args.device)
    names = {"global": "SelfBootTok (global tokens)", "all": "baseline (all tokens)"}
    keys = list(rows["global"])
    lines = [f"# Throughput, preset `{preset}`, batch {batch}, {machine}",
             "",
             f"Images/s, median of {args.repeats} steps; {'bf16 autocast' if cuda else 'fp32'}; "
             f"MaskGIT with {args.sample_steps} steps, AR one step per token (KV cache).",
             "",
             "| mode | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for mode, row in rows.items():
        lines.append(f"| {names[mode]} | " + " | ".join(f"{row[k]:.1f}" for k in keys) + " |")
    lines.append("| ours / baseline | " + " | ".join(f"{rows['global'][k] / rows['all'][k]:.2f}x" for k in keys) + " |")
    table = "\n".join(lines)
    print(table)
    write_results(args.out, f"throughput-{preset}", machine,
                  {"machine": machine, "preset": preset, "batch": batch, "repeats": args.repeats,
                   "sample_steps": args.sample_steps, "rows": rows}, table)


if __name__ == "__main__":
    main()
