"""
The prepared GPU measurement: one command that, on the GPU it is given, measures what no CPU can
and writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (a table for the README):

  1. pretrain_8b.py --benchmark on full-width LLaDA-8B blocks (as many as fit one GPU), eager and
     compiled, under each activation-checkpointing policy: tokens/s per GPU, MFU, and the peak
     memory beside the peak the trace on fake tensors (plan.trace) predicts for the same model;
  2. wikitext.py --benchmark: the 50M model's training throughput and MFU;
  3. eval_8b.py --benchmark: tokens/s of LLaDA's sampler on the 8B architecture.

    python gpu_check.py                       # one GPU: <= 10 minutes; on a CPU: tiny presets, a minute
    python gpu_check.py --gpus 8              # 8 GPUs: the full model under torchrun (step 1 at full depth)

Each measurement runs as its own process (a failure, an out-of-memory included, is recorded and the
next one runs), with a time limit, and the table says on which device every number was measured.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from machinery import cli, files
from machinery.run import prepare_out_dir

ROOT = os.path.dirname(os.path.abspath(__file__))


def steps_on(device, gpus, gpu_gib, trace):
    """The measurements, as (name, command, the folder of its benchmark.json)."""
    py = [sys.executable]
    if device == "cpu":                  # the tiny presets: the same code paths, in seconds
        pretrain = [("tiny", policy, False, 0, 8) for policy in ("none", "full")]
        wikitext, gen = ["--preset", "tiny", "--bench-steps", "2"], ["--preset", "tiny", "--gen-length", "32",
                                                                     "--steps", "32", "--block-length", "32"]
    else:                                # full-width LLaDA blocks: 8 of 32 fit one 141 GiB H200, 4 an 80 GiB H100
        layers = 0 if gpus > 1 else (8 if gpu_gib > 120 else 4)
        pretrain = [("llada-8b", policy, False, layers, 8 * gpus) for policy in ("none", "selective", "full")]
        pretrain += [("llada-8b", "selective", True, layers, 8 * gpus)]
        wikitext, gen = ["--bench-steps", "10", "--compile"], ["--preset", "llada-8b", "--gen-length", "256",
                                                               "--steps", "256", "--block-length", "32",
                                                               "--batch-size", "8"]
    out = []
    for preset, policy, compiled, layers, batch in pretrain:
        name = f"pretrain {preset} {layers or 'all'} blocks --ac {policy} {'compiled' if compiled else 'eager'}"
        folder = f"pt_{preset}_{policy}_{'c' if compiled else 'e'}"
        launcher = py if gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         f"--nproc_per_node={gpus}"]
        cmd = launcher + [os.path.join(ROOT, "pretrain_8b.py"), "--preset", preset, "--benchmark", "--device", device,
                          "--ac", policy, "--bench-layers", str(layers), "--bench-steps", "3", "--batch-size",
                          str(batch), "--compile" if compiled else "--no-compile"]
        out.append((name, cmd + ["--bench-trace"] if trace else cmd, folder))
    out.append(("wikitext 50M" if device != "cpu" else "wikitext tiny",
                py + [os.path.join(ROOT, "wikitext.py"), "--benchmark", "--device", device, *wikitext], "wikitext"))
    out.append(("generate" + (" llada-8b" if device != "cpu" else " tiny"),
                py + [os.path.join(ROOT, "eval_8b.py"), "--benchmark", "--device", device, *gen], "generate"))
    return out


def run_step(name, cmd, folder, out_dir, limit_s):
    """One measurement in a process of its own: its benchmark.json, or what went wrong."""
    where = os.path.join(out_dir, folder)
    start = time.time()
    try:
        r = subprocess.run(cmd + ["--out-dir", where], capture_output=True, text=True, timeout=limit_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(name=name, error=f"took longer than {limit_s:.0f} s")
    result = dict(name=name, seconds=round(time.time() - start, 1), command=" ".join(cmd[1:]))
    path = os.path.join(where, "benchmark.json")
    if r.returncode or not os.path.exists(path):
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        return dict(result, error=("out of memory: " if "out of memory" in r.stderr.lower() else "") + tail[0][:300])
    with open(path) as f:
        return dict(result, **json.load(f))


def markdown(results, device_name):
    lines = [f"Measured on {device_name} by `python gpu_check.py` ({time.strftime('%Y-%m-%d')}).", "",
             "| measurement | tokens/s (per GPU) | MFU | peak memory GiB (traced) | note |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | — | — | — | {r['error']} |")
        elif "tokens_per_sec_per_gpu" in r:
            mem = "—" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f}"
            traced = f" ({r['traced_peak_gib']:.1f})" if r.get("traced_peak_gib") is not None else ""
            mfu = "—" if not r.get("mfu") else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {r['name']} | {r['tokens_per_sec_per_gpu']:,.0f} | {mfu} | {mem}{traced} | "
                         f"{r['accumulation']} x {r['micro_batch']} x {r['block_size']} tokens a step; head "
                         f"{100 * r['head_share']:.0f}% of the FLOPs |")
        elif "masked_head" in r:
            for head in ("masked_head", "full_head"):
                h = r[head]
                mfu = "—" if not h.get("mfu") else f"{100 * h['mfu']:.1f}%"
                mem = "—" if h.get("peak_memory_gib") is None else f"{h['peak_memory_gib']:.1f}"
                lines.append(f"| {r['name']}, {head.replace('_', ' ')} | {h['tokens_per_sec']:,.0f} | {mfu} | {mem} | "
                             f"micro-batch {r['micro_batch']} x {r['block_size']} |")
        else:
            for batch, b in r["batches"].items():
                lines.append(f"| {r['name']}, batch {batch} | {b['tokens_per_sec']:,.1f} generated | — | — | "
                             f"{r['gen_length']} tokens in {r['steps']} steps |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (%(default)s)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the pre-training benchmark (%(default)s)")
    p.add_argument("--out-dir", default="out/gpu_check", help="gpu_check.json, gpu_check.md (%(default)s)")
    p.add_argument("--limit", type=float, default=150, help="seconds one measurement may take (%(default)s)")
    p.add_argument("--no-trace", dest="trace", action="store_false", help="skip the fake-tensor traces")
    a = p.parse_args(argv)
    device = cli.pick_device(a.device)
    cli.check_positive(gpus=a.gpus, limit=a.limit)
    if device.startswith("cuda") and a.gpus > torch.cuda.device_count():
        raise cli.UserError(f"--gpus {a.gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    prepare_out_dir(a.out_dir)
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0
    results = []
    for step_name, cmd, folder in steps_on("cuda" if cuda else "cpu", a.gpus, gpu_gib, a.trace):
        r = run_step(step_name, cmd, folder, a.out_dir, a.limit)
        results.append(r)
        print(f"{step_name}: " + (r["error"] if "error" in r else "done"), flush=True)
        files.write_json(os.path.join(a.out_dir, "gpu_check.json"), dict(device=name, gpus=a.gpus, results=results))
    files.write_text(os.path.join(a.out_dir, "gpu_check.md"), markdown(results, name))
    print(f"wrote {a.out_dir}/gpu_check.json, gpu_check.md")


if __name__ == "__main__":
    cli.run_cli(main)
