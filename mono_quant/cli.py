"""The ``mono-quant`` command.

``mono-quant calibrate`` calibrates every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` input of a model with
several observers at once, scores each observer's qparams by the SQNR of a held-out batch fake-quantized
with them, and prints a table per layer (see ``mono_quant.compare``). Without ``--model`` it runs on the
built-in demo transformer (``mono_quant.demo``). ``mono-quant bench`` runs ``mono_quant.bench``.

Every mistake in the arguments ends the command with one line on stderr (what is wrong, what is allowed)
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time

from mono_quant.args import CLIError, Parser, one_line, positive_int

__all__ = ["CLIError", "main"]

PROG = "mono-quant"
DTYPE_NAMES = ("int8", "uint8", "int4", "uint4")
QSCHEMES = ("affine", "symmetric")
DEFAULT_BATCHES = 16

_CALIBRATE_EPILOG = """\
observers (--observer, comma-separated; default: all):
  minmax          running min / max
  moving_average  moving average of each batch's min / max (averaging_constant 0.01)
  kl              histogram, KL-divergence threshold (TensorRT / ModelOpt entropy calibration)
  mse             histogram, range with the least expected squared error
  percentile      histogram, 99.99th percentile
  per_channel     per-channel min / max (last axis of Linear inputs, axis 1 of Conv inputs); the table
                  shows the outermost range and the mean scale / zero point (~)

output: per layer and observer, the clip range the qparams represent, scale, zero point, the SQNR (dB) of
the layer's input on a held-out batch fake-quantized with them (higher is better; * marks the best of the
layer) and the time the observer took (observing + calculate_qparams); then a summary per observer and a
last line naming the observer that won the most layers.

data: --data FILE.pt holds a tensor (one batch: model(x)), or a list of batches, each a tensor, a
list/tuple of tensors (model(*batch)) or a dict (model(**batch)). The last batch is held out for the SQNR
(with a single batch, the SQNR is measured on it). Without --data, the model's example_inputs(n) method,
if it has one, supplies n batches; the demo has one.

files:
  --save        JSON: {"dtype", "qscheme", "qmin", "qmax", "layers": {layer: {"best": observer, "observers":
                {observer: {"scale", "zero_point" (numbers, or lists per channel), "ch_axis", "range",
                "sqnr_db", "observer" (class), "settings" (its constructor keywords), ...}}}}}
  --save-state  torch.save of {"format": "mono_quant.observer_state", "version": 1, "observers":
                {observer: {"class": name, "layers": {layer: {"kwargs": {...}, "state_dict": {...}}}}}};
                mono_quant.io.load_state(path) rebuilds the observers ({observer: {layer: obs}}) to
                continue calibrating, or to merge runs with mono_quant.merge_observers

examples:
  mono-quant calibrate                                     # the built-in demo, every observer
  mono-quant calibrate --observer minmax,kl --dtype int4 --qscheme symmetric
  mono-quant calibrate --model mypkg.models:build_model --data calib.pt --batches 32
  mono-quant calibrate --save qparams.json --save-state observers.pt --plot ranges.png
  PYTHONPATH=src mono-quant calibrate --model tiny:make --data batches.pt --device cuda --quiet
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``mono-quant`` argument parser (subcommands ``calibrate`` and ``bench``)."""
    from mono_quant._version import __version__

    parser = Parser(prog=PROG, description="Calibration observers for int8/int4 quantization.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{calibrate,bench}")
    cal = sub.add_parser(
        "calibrate",
        help="calibrate a model (default: the built-in demo) and compare the observers layer by layer",
        description="Calibrate a model's layer inputs with several observers and compare them per layer.",
        epilog=_CALIBRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cal.add_argument(
        "--model", metavar="MODULE:FACTORY", help="a callable returning an nn.Module (default: demo)"
    )
    cal.add_argument("--data", metavar="FILE.pt", help="calibration batches saved with torch.save")
    cal.add_argument("--observer", default="all", help="observer names, comma-separated, or 'all' (default)")
    cal.add_argument("--dtype", default="int8", choices=DTYPE_NAMES, help="quantized type (default int8)")
    cal.add_argument("--qscheme", default="affine", choices=QSCHEMES, help="default affine")
    cal.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps"
    )
    cal.add_argument(
        "--batches",
        type=positive_int,
        metavar="N",
        help=f"calibration batches (default: {DEFAULT_BATCHES} from the demo or a model's example_inputs, "
        "all but the last for --data)",
    )
    cal.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads for torch (default: 1 for the small demo, torch's default otherwise)",
    )
    cal.add_argument("--quiet", action="store_true", help="no progress bar and no notes; the table stays")
    cal.add_argument(
        "--plot", metavar="OUT.png", help="histograms with each observer's range (needs matplotlib)"
    )
    cal.add_argument(
        "--save", metavar="QPARAMS.json", help="write every layer's qparams per observer as JSON"
    )
    cal.add_argument(
        "--save-state", metavar="OBSERVERS.pt", help="write the observers' state_dicts (torch.save)"
    )
    sub.add_parser("bench", help="benchmark the observers (see mono-quant bench --help)", add_help=False)
    return parser


# --- argument checks ---------------------------------------------------------------------------------------


def _err(message: str) -> CLIError:
    return CLIError(f"{PROG} calibrate: error: {message}")


def _observer_kinds(text: str) -> list[str]:
    from mono_quant.compare import COMPARED
    from mono_quant.core.registry import observer_name

    if text.strip().lower() == "all":
        return list(COMPARED)
    kinds = []
    for name in text.split(","):
        try:
            key = observer_name(name.strip())
        except ValueError:
            allowed = ", ".join(COMPARED)
            raise _err(
                f"--observer: unknown observer {name.strip()!r}; choose from {allowed} (or any observer name "
                "of mono_quant.create_observer), or all"
            ) from None
        if key not in kinds:
            kinds.append(key)
    return kinds


def _device(text: str):
    import torch

    allowed = "use auto, cpu, cuda, cuda:N or mps"
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise _err(f"--device {text!r} is not a device name; {allowed}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise _err(f"--device {text}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise _err(f"--device {text}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise _err(f"--device {text}: MPS is not available on this machine; use --device cpu")
        return dev
    raise _err(f"--device {text}: device type {dev.type!r} is not supported; {allowed}")


def _check_output(flag: str, path: str | None) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _err(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise _err(f"{flag} {path}: is a folder; give a file name")


def _load_model(spec: str):
    from torch import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _err(f"--model {spec!r}: expected package.module:factory, e.g. mypkg.models:build_model")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules in the current folder import
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise _err(
            f"--model {spec}: cannot import {module_name!r} ({one_line(e)}); is it on PYTHONPATH?"
        ) from None
    except Exception as e:
        raise _err(f"--model {spec}: importing {module_name!r} raised {one_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _err(f"--model {spec}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise _err(
            f"--model {spec}: {attr!r} is a {type(obj).__name__}, expected a callable returning an nn.Module"
        )
    try:
        model = obj()
    except Exception as e:
        raise _err(f"--model {spec}: calling {attr}() raised {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise _err(f"--model {spec}: {attr}() returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def _valid_batch(b) -> bool:
    import torch

    if isinstance(b, torch.Tensor):
        return True
    if isinstance(b, dict):
        return all(isinstance(k, str) for k in b)
    return isinstance(b, (list, tuple))


def _load_data(path: str) -> list:
    import torch

    if not os.path.exists(path):
        raise _err(f"--data {path}: no such file")
    if os.path.isdir(path):
        raise _err(f"--data {path}: is a folder; give a file written by torch.save")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _err(f"--data {path}: torch.load(weights_only=True) cannot read it ({one_line(e)})") from None
    expected = "a tensor, a list of tensors, or a list of dict batches"
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and obj and all(_valid_batch(b) for b in obj):
        return list(obj)
    what = "an empty list" if isinstance(obj, (list, tuple)) and not obj else f"a {type(obj).__name__}"
    raise _err(f"--data {path}: holds {what}; expected {expected}")


# --- calibrate ---------------------------------------------------------------------------------------------


def _batches(args, model) -> tuple[list, object, str]:
    """``(calibration batches, held-out batch, description)`` from --data, the model, or the demo."""
    if args.data is not None:
        data = _load_data(args.data)
        if len(data) == 1:
            if args.batches not in (None, 1):
                raise _err(f"--batches {args.batches}: {args.data} holds 1 batch")
            return data, data[0], f"1 batch from {args.data} (SQNR measured on it: no batch left to hold out)"
        n = len(data) - 1
        if args.batches is not None and args.batches > n:
            raise _err(
                f"--batches {args.batches}: {args.data} holds {len(data)} batches, so at most {n} for "
                "calibration (the last is held out for the SQNR)"
            )
        n = args.batches or n
        return data[:n], data[-1], f"{n} batches from {args.data} + the last one held out"
    n = args.batches or DEFAULT_BATCHES
    example = getattr(model, "example_inputs", None)
    if not callable(example):
        raise _err(
            f"--model {args.model}: no calibration data; pass --data FILE.pt (a tensor, a list of tensors or "
            "a list of dict batches) or give the model an example_inputs(num_batches) method"
        )
    try:
        data = list(example(n + 1))
    except Exception as e:
        raise _err(f"--model {args.model}: example_inputs({n + 1}) raised {one_line(e)}") from None
    if len(data) < 2:
        raise _err(
            f"--model {args.model}: example_inputs({n + 1}) returned {len(data)} batches, expected {n + 1}"
        )
    return data[:-1][:n], data[-1], f"{min(n, len(data) - 1)} batches from example_inputs() + 1 held out"


def _calibrate(args) -> int:
    import torch

    # Small tensors gain little from intra-op threads, and on a busy machine OpenMP workers that wait for
    # each other make the demo 3-6x slower (measured on 2 cores: 15-34 s with 2 threads, 4-6 s with 1).
    threads = args.threads or (1 if args.model is None else None)
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        return _compare(args)
    finally:
        torch.set_num_threads(before)


def _compare(args) -> int:
    from mono_quant import compare, io, plot
    from mono_quant.calibration import engine

    kinds = _observer_kinds(args.observer)
    device = _device(args.device)
    for flag, path in (("--save", args.save), ("--save-state", args.save_state), ("--plot", args.plot)):
        _check_output(flag, path)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise _err("--plot needs matplotlib, which is not installed: pip install 'mono_quant[plot]'")

    if args.model is None:
        from mono_quant import demo

        model = demo.demo_model()
        name = "demo"
        what = (
            f"demo transformer ({demo.LAYERS} blocks, hidden {demo.HIDDEN}, outlier channels "
            f"{', '.join(map(str, demo.OUTLIER_CHANNELS))})"
        )
    else:
        model = _load_model(args.model)
        name = what = args.model
    calibration, held_out, source = _batches(args, model)
    try:
        model.to(device)
        engine.target_modules(model)
    except ValueError as e:
        raise _err(f"--model {name}: {e}") from None

    dtype = compare.DTYPES[args.dtype]
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    try:
        cmp = compare.compare_observers(
            model, calibration, held_out, kinds, dtype, args.qscheme, device, progress=progress
        )
    except RuntimeError as e:  # the model failed on a batch: the data does not fit the model
        raise _err(f"--model {name}: {str(e).strip().splitlines()[0]}") from None
    elapsed = time.perf_counter() - t0

    if not args.quiet:
        print(f"{what}: {source}; {args.dtype} {args.qscheme}; {device}")
        print("SQNR: held-out layer input fake-quantized with each observer's qparams, dB (higher is better)")
        print()
    print(compare.format_table(cmp))
    print()
    print(compare.format_summary(cmp))
    if not args.quiet:
        print(f"calibration and scoring took {elapsed:.2f} s")
    if args.save:
        io.save_qparams(cmp, args.save, model=name)
    if args.save_state:
        observers = {layer: {k: s.observer for k, s in row.items()} for layer, row in cmp.scores.items()}
        io.save_state(observers, args.save_state)
    if args.plot:
        inputs = engine.capture_inputs(model, held_out, device)
        plot.plot_comparison(cmp, args.plot, inputs)
    if not args.quiet:
        for flag, path in (("qparams", args.save), ("observer state", args.save_state), ("plot", args.plot)):
            if path:
                print(f"wrote {flag} to {path}")
    print(compare.winner_line(cmp))
    return 0


def _bench(argv: list[str]) -> int:
    from mono_quant import bench

    return bench.main(argv)


def main(argv: list[str] | None = None) -> int:
    """Run ``mono-quant``; returns the exit code (0 success, 2 bad arguments).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help and --version
            return int(e.code or 0)
        if args.command is None:
            raise CLIError(
                f"{PROG}: error: choose a command: calibrate or bench (try: {PROG} calibrate --help)"
            )
        return _calibrate(args)
    except CLIError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
