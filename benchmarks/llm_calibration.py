"""End-to-end calibration of a Llama-like model built from a config: mono_quant's observers against plain
forwards and ModelOpt's calibration, in one run.

Every row calibrates the same model on the same batches (dict batches with an attention mask, as a
tokenizer gives them; every ``nn.Linear`` input, ``lm_head`` included) and reports medians over
``--rounds``:

- ``forward ms``: the calibration forwards, per batch (hooks and observers included);
- ``overhead``: that over the plain forward's (no hooks, same ``torch.no_grad()``, measured in the same
  run, before each row), in percent;
- ``finish s``: what comes after the forwards: every layer's qparams (mono_quant; ``kl`` / ``mse``: the
  threshold search), ModelOpt's amax (its entropy search per quantizer);
- ``peak MiB``: the peak memory one calibration allocates beyond the model and batches
  (``mono_quant.timing.peak_extra_bytes``: exact on CUDA, from the profiler's allocation events on CPU),
  in a separate, untimed run.

ModelOpt (``nvidia-modelopt``, optional: its rows are left out, with the reason, where it does not import):
``max``: ``mtq.quantize(model, INT8_DEFAULT_CFG, forward_loop)`` as users call it (its weight quantizers
calibrate too, a max over each weight in each forward; mono_quant's rows observe activations only).
``entropy``: the same config with the input quantizers on its histogram calibrator and the weight
quantizers off, converted without calibration, then ``enable_stats_collection``, the forward loop and
``finish_stats_collection(method="entropy")`` (``mtq.quantize`` has no entropy algorithm). Each ModelOpt
round converts a fresh copy of the model (the copy neither timed nor counted in the peak; the conversion
counted in the peak, and in the time of ``max`` only). Its entropy search takes minutes on a CPU:
``--modelopt-rounds`` (default 1) rounds of it, and its peak memory covers the forwards only.

    python benchmarks/llm_calibration.py                  # CPU: 4 layers, hidden 512, 4 x 512 tokens
    python benchmarks/llm_calibration.py --h200 --json out.json   # 8 layers, hidden 4096, 4 x 2048, bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # llama_like
import mono_quant as mq  # noqa: E402
from mono_quant.calibration.engine import target_modules  # noqa: E402
from mono_quant.timing import peak_extra_bytes, synchronize  # noqa: E402

MONO_ROWS = {  # row -> (observer, observer_kwargs)
    "mono_quant minmax": ("minmax", {}),
    "mono_quant histogram, kl": ("kl", {}),
    "mono_quant histogram, mse": ("mse", {}),
    "mono_quant per_channel": ("per_channel", {}),
}
MODELOPT_ROWS = ("modelopt int8 max", "modelopt int8 entropy")
PROFILES = {
    "cpu": dict(layers=4, hidden=512, batches=4, tokens=512, batch_size=1, dtype="float32", device="cpu"),
    "h200": dict(
        layers=8, hidden=4096, batches=4, tokens=2048, batch_size=1, dtype="bfloat16", device="cuda"
    ),
}


def build_model(layers: int, hidden: int, vocab: int, device, dtype, kind: str = "auto") -> torch.nn.Module:
    """A Llama with random weights: ``hidden / 64`` heads (a quarter of them for keys and values),
    intermediate ``8/3 * hidden`` rounded to 256, as Llama's are. ``kind``: ``"hf"`` (transformers'
    ``LlamaForCausalLM`` from a config), ``"plain"`` (``llama_like.LlamaLike``: the same layers in plain
    torch, for machines without transformers) or ``"auto"`` (``hf`` where transformers imports)."""
    heads = max(1, hidden // 64)
    kv_heads, inner = max(1, heads // 4), (8 * hidden // 3 + 255) // 256 * 256
    if kind == "auto":
        kind = "hf" if _transformers() else "plain"
    torch.manual_seed(0)
    if kind == "plain":
        from llama_like import LlamaLike

        model = LlamaLike(vocab, hidden, layers, heads, kv_heads, inner)
    else:
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inner,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=8192,
        )
        model = transformers.LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def _transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def make_batches(n: int, batch_size: int, tokens: int, vocab: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, tokens), generator=g)
        mask = torch.ones_like(ids)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False})
    return out


def _timed(fn, device) -> tuple[object, float]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def plain_forwards(model, batches) -> None:
    with torch.no_grad():
        for b in batches:
            model(**b)


def mono_run(model, batches, kind: str, kwargs: dict, device) -> tuple[float, float]:
    """``(forward seconds, finish seconds)`` of one ``run_calibration`` and its qparams."""
    result, forward = _timed(lambda: mq.run_calibration(model, batches, kind, observer_kwargs=kwargs), device)
    _, finish = _timed(result.qparams, device)
    return forward, finish


def modelopt_skip_reason() -> str | None:
    try:
        import modelopt.torch.quantization  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure leaves its rows out
        return f"modelopt does not import: {type(e).__name__}: {e}"[:200]
    return None


def _entropy_config() -> dict:
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    entries = []
    for entry in config["quant_cfg"]:
        entry = dict(entry)
        if entry.get("quantizer_name") == "*input_quantizer":
            entry["cfg"] = {**entry["cfg"], "calibrator": "histogram"}
        elif entry.get("quantizer_name") == "*weight_quantizer":
            entry = {"quantizer_name": "*weight_quantizer", "enable": False}
        entries.append(entry)
    return {"quant_cfg": entries, "algorithm": None}


def modelopt_run(fresh, batches, method: str, device, forwards_only: bool = False) -> tuple[float, float]:
    """``(forward seconds, finish seconds)`` of ModelOpt's calibration of ``fresh`` (a copy of the model
    that this call converts)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import model_calib

    if method == "max":
        forward = [0.0]

        def loop(m):
            forward[0] = _timed(lambda: plain_forwards(m, batches), device)[1]

        _, total = _timed(lambda: mtq.quantize(fresh, mtq.INT8_DEFAULT_CFG, forward_loop=loop), device)
        return forward[0], total - forward[0]
    mtq.quantize(fresh, _entropy_config(), forward_loop=None)  # conversion only: not timed
    model_calib.enable_stats_collection(fresh)
    _, forward = _timed(lambda: plain_forwards(fresh, batches), device)
    if forwards_only:
        return forward, 0.0
    _, finish = _timed(lambda: model_calib.finish_stats_collection(fresh, method="entropy"), device)
    return forward, finish


def measure(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.layers, args.hidden, args.vocab, device, dtype, args.model)
    batches = make_batches(args.batches, args.batch_size, args.tokens, args.vocab, device)
    plain_forwards(model, batches[:1])  # warm-up
    rows: dict[str, dict] = {}
    plain_all: list[float] = []

    def row(name, fn, rounds, memory_fn):  # memory_fn(): the call whose peak memory is measured
        plain, forward, finish = [], [], []
        for _ in range(rounds):
            plain.append(_timed(lambda: plain_forwards(model, batches), device)[1])
            f, g = fn()
            forward.append(f)
            finish.append(g)
        plain_all.extend(plain)
        peak = peak_extra_bytes(memory_fn(), device)
        fwd, base = statistics.median(forward), statistics.median(plain)
        rows[name] = {
            "forward_ms": 1e3 * fwd / len(batches),
            "plain_forward_ms": 1e3 * base / len(batches),
            "overhead_pct": 100 * (fwd / base - 1),
            "finish_s": statistics.median(finish),
            "total_s": fwd + statistics.median(finish),
            "peak_mib": None if peak is None else peak / 2**20,
            "rounds": rounds,
        }
        print(f"{name:28} {rows[name]['forward_ms']:9.1f} ms/batch {rows[name]['overhead_pct']:+7.1f} % "
              f"finish {rows[name]['finish_s']:8.2f} s", file=sys.stderr, flush=True)  # fmt: skip

    row("plain forward", lambda: (_timed(lambda: plain_forwards(model, batches), device)[1], 0.0),
        args.rounds, lambda: lambda: plain_forwards(model, batches))  # fmt: skip
    for name, (kind, kwargs) in MONO_ROWS.items():
        run = lambda kind=kind, kwargs=kwargs: mono_run(model, batches, kind, kwargs, device)
        row(name, run, args.rounds, lambda run=run: run)
    skip = modelopt_skip_reason() if not args.no_modelopt else "--no-modelopt"
    if skip is None:

        def modelopt(
            method, forwards_only=False
        ):  # the copy is made before the call: neither timed nor counted
            fresh = copy.deepcopy(model)
            return lambda: modelopt_run(fresh, batches, method, device, forwards_only)

        row("modelopt int8 max", lambda: modelopt("max")(), args.rounds, lambda: modelopt("max"))
        if args.modelopt_entropy:
            row("modelopt int8 entropy", lambda: modelopt("entropy")(), args.modelopt_rounds,
                lambda: modelopt("entropy", forwards_only=True))  # fmt: skip
    return {
        "config": {
            k: getattr(args, k)
            for k in (
                "layers",
                "hidden",
                "vocab",
                "batches",
                "tokens",
                "batch_size",
                "dtype",
                "device",
                "rounds",
                "modelopt_rounds",
            )
        },
        "model": type(model).__name__,
        "layers_observed": len(target_modules(model)),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "modelopt": skip or _modelopt_version(),
        "rows": rows,
    }


def _modelopt_version() -> str:
    import modelopt

    return f"nvidia-modelopt {modelopt.__version__}"


def table(out: dict) -> str:
    lines = [
        "| row | forward ms / batch | overhead | finish s | total s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in out["rows"].items():
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        over = "-" if name == "plain forward" else f"{r['overhead_pct']:+.1f} %"
        cells = (name, f"{r['forward_ms']:.1f}", over, f"{r['finish_s']:.2f}", f"{r['total_s']:.2f}", peak)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--h200", action="store_true", help="the H200 profile (8 layers, hidden 4096, bf16)")
    for key in ("layers", "hidden", "batches", "tokens", "batch_size"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--model", choices=["auto", "hf", "plain"], default="auto", help="see build_model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modelopt-rounds", type=int, default=1)
    p.add_argument("--no-modelopt", action="store_true", help="leave ModelOpt's rows out")
    p.add_argument("--modelopt-entropy", action=argparse.BooleanOptionalAction, default=None,
                   help="ModelOpt's entropy row (default: on, off with --h200: its search takes about 10 s "
                   "of host time per quantizer, minutes for 57 of them)")  # fmt: skip
    p.add_argument("--json", help="write the results there")
    args = p.parse_args(argv)
    if args.modelopt_entropy is None:
        args.modelopt_entropy = not args.h200
    for key, value in PROFILES["h200" if args.h200 else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = measure(args)
    print(table(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
