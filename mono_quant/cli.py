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
import os
import sys
import textwrap
import time

from mono_quant.args import (
    CLIError,
    Parser,
    observer_choices,
    one_line,
    positive_int,
    thread_count,
)
from mono_quant.cli_inputs import (
    DEFAULT_BATCHES,
    PROG,
    check_exports,
    check_outputs,
    default_threads,
    error,
    load_model,
    observer_kinds,
    output_files,
    parse_device,
    read_batches,
    timing_line,
)
from mono_quant.compare import DTYPES

__all__ = ["EXIT_BROKEN_PIPE", "CLIError", "main"]

QSCHEMES = ("affine", "symmetric")
# stdout closed early (``mono-quant calibrate | head -5``): exit quietly with the status a Unix tool killed
# by SIGPIPE reports in a shell (128 + 13), so ``set -o pipefail`` still sees that the output was cut
EXIT_BROKEN_PIPE = 141

_CALIBRATE_EPILOG = """\
observers (--observer, comma-separated; default all: minmax,moving_average,kl,mse,percentile,per_channel):
  minmax          running min / max
  moving_average  moving average of each batch's min / max (averaging_constant 0.01)
  kl              histogram, KL-divergence threshold (TensorRT / ModelOpt entropy calibration)
  mse             histogram, range with the least expected squared error
  percentile      histogram, 99.99th percentile
  per_channel     per-channel min / max (last axis of Linear inputs, axis 1 of Conv inputs); the table
                  shows the outermost range and the mean scale / zero point (~)
  histogram       the histogram with its default method, kl
  moving_average_per_channel
                  per-channel moving average (averaging_constant 0.01)
@NAMES@

output: per layer and observer, the clip range the qparams represent, scale, zero point, the SQNR (dB) of
the layer's input on a held-out batch fake-quantized with them (higher is better; * marks the best of the
layer; n/a where the held-out input of the layer has no finite non-zero value, so no SQNR can be measured:
such layers count in no mean and no win) and the time the observer took (observing + calculate_qparams);
then a summary per observer and a last line naming the observer that won the most layers.

data: --data FILE.pt holds a tensor (one batch: model(x)), or a list of batches, each a tensor, a
list/tuple of tensors (model(*batch)) or a dict of tensors (model(**batch), or model(batch) when forward
takes one argument the keys do not name, as sentence-transformers models do). It is read with
torch.load(weights_only=True): save plain tensors, lists, tuples and dicts, e.g. dict(enc) for a
tokenizer's BatchEncoding. The last batch is held out for the SQNR (with a single batch, the SQNR is
measured on it). Without --data, the model's example_inputs(n) method, if it has one, supplies the batches
(at most --batches + 1 are read; a generator may be endless); the demo has one.

files: each output is checked before calibrating (its folder exists and takes files, the name is allowed,
an existing file is writable, --plot has a format matplotlib writes) and may not name --data or another
output. An existing file is replaced only once the new one is complete (written beside it, then renamed),
so a failed write leaves it as it was; a write that fails after calibrating prints one line, exit code 2.
  --save        strict JSON (RFC 8259): {"format": "mono_quant.qparams", "version": 2, "dtype", "qscheme",
                "qmin", "qmax", "layers": {layer: {"best": observer or null, "observers": {observer:
                {"scale", "zero_point" (numbers, or lists per channel), "ch_axis", "range", "sqnr_db"
                (null: n/a), "observer" (class), "settings" (its constructor keywords), ...}}}}}; a number
                that is not finite is the string "inf", "-inf" or "nan"; mono_quant.io.load_qparams(path)
                reads it back
  --save-state  torch.save of {"format": "mono_quant.observer_state", "version": 1, "observers":
                {observer: {"class": name, "layers": {layer: {"kwargs": {...}, "state_dict": {...}}}}}};
                mono_quant.io.load_state(path) checks it and rebuilds the observers ({observer: {layer:
                obs}}) to continue calibrating, or to merge runs with mono_quant.merge_observers; a file
                it cannot load raises mono_quant.io.StateFileError naming what is wrong and where
  --plot        the image format follows the extension (png, pdf, svg, ...; png without one)
  --export      FORMAT:PATH, several allowed: tensorrt (a TensorRT calibration cache: per-tensor symmetric
                int8, so --qscheme symmetric), safetensors (<layer>.input_scale, input_zero_point (affine)
                and weight_scale [out, 1]: the names of vLLM's compressed-tensors loader; int8 or
                fp8_e4m3), json (as --save); per layer the observer --export-observer names, or (best) the
                best SQNR among those the format holds; checked before calibrating

exit status: 0 done, 2 a mistake in the arguments or an output that cannot be written (one line on
stderr), 130 interrupted, 141 stdout closed early (mono-quant calibrate | head): the rest is dropped
quietly, as Unix tools do.

examples:
  mono-quant calibrate                                     # the built-in demo, every observer
  mono-quant calibrate --observer minmax,kl --dtype int4 --qscheme symmetric
  mono-quant calibrate --model mypkg.models:build_model --data calib.pt --batches 32
  mono-quant calibrate --save qparams.json --save-state observers.pt --plot ranges.png
  mono-quant calibrate --qscheme symmetric --export tensorrt:calib.cache --export safetensors:scales.st
  PYTHONPATH=src mono-quant calibrate --model tiny:make --data batches.pt --device cuda --quiet
"""


def _all_names() -> str:
    text = f"all names: {observer_choices()}: the names of mono_quant.create_observer"
    return textwrap.fill(text, width=104, initial_indent="  ", subsequent_indent="  ")


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
        epilog=_CALIBRATE_EPILOG.replace("@NAMES@", _all_names()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cal.add_argument(
        "--model", metavar="MODULE:FACTORY", help="a callable returning an nn.Module (default: demo)"
    )
    cal.add_argument("--data", metavar="FILE.pt", help="calibration batches saved with torch.save")
    cal.add_argument(
        "--observer",
        default="all",
        help="observer names, comma-separated, or 'all' (default; the first six of the list below)",
    )
    cal.add_argument("--dtype", default="int8", choices=list(DTYPES), help="quantized type (default int8)")
    cal.add_argument(
        "--qscheme",
        default=None,
        choices=QSCHEMES,
        help="default: affine (integers), symmetric (FP8)",
    )
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
        type=thread_count,
        metavar="N",
        help="CPU threads for torch, from 1 to this machine's CPU count (default: 1 for the small demo; "
        "for a model, torch's count, but no more than the CPUs idle when it starts, at least 1)",
    )
    cal.add_argument("--quiet", action="store_true", help="no progress bar and no notes; the table stays")
    cal.add_argument(
        "--plot",
        metavar="OUT.png",
        help="histograms with each observer's range; png, pdf, svg, ... by extension (needs matplotlib)",
    )
    cal.add_argument(
        "--save", metavar="QPARAMS.json", help="write every layer's qparams per observer as strict JSON"
    )
    cal.add_argument(
        "--save-state", metavar="OBSERVERS.pt", help="write the observers' state_dicts (torch.save)"
    )
    cal.add_argument(
        "--export",
        action="append",
        metavar="FORMAT:PATH",
        help="write qparams for an engine: tensorrt (calibration cache), safetensors (vLLM "
        "compressed-tensors scale names), json (as --save); may be given several times",
    )
    cal.add_argument(
        "--export-observer",
        default="best",
        metavar="KIND",
        help="the observer each --export writes per layer: best (default: the best SQNR among those the "
        "format can hold) or an observer name",
    )
    sub.add_parser("bench", help="benchmark the observers (see mono-quant bench --help)", add_help=False)
    return parser


def _calibrate(args) -> int:
    import torch

    threads = args.threads or default_threads(args)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return _compare(args, threads)
    finally:
        torch.set_num_threads(before)


def _write_outputs(args, cmp, model, held_out, device, name: str) -> tuple[list[str], list[str]]:
    """Write --save, --save-state and --plot: ``(lines saying what was written, lines saying what failed)``.

    A failed write does not stop the others; an existing file it was to replace stays as it was.
    """
    from mono_quant import io, plot
    from mono_quant.calibration import engine
    from mono_quant.export import FORMATS, export

    def qparams(path):
        io.save_qparams(cmp, path, model=name)

    def state(path):
        io.save_state(
            {layer: {k: s.observer for k, s in row.items()} for layer, row in cmp.scores.items()}, path
        )

    def figure(path):
        plot.plot_comparison(cmp, path, engine.capture_inputs(model, held_out, device))

    def exporter(fmt: str):
        def write(path):
            done = export(cmp, path, fmt, observer=args.export_observer, model=model)
            kinds = sorted(set(done.layers.values()))
            return f" ({len(done.layers)} layers; observers: {', '.join(kinds)})"

        return write

    writers = {
        "--save": ("qparams", qparams),
        "--save-state": ("observer state", state),
        "--plot": ("plot", figure),
    }
    writers.update({f"--export {fmt}": (f"{fmt} export", exporter(fmt)) for fmt in FORMATS})
    wrote, failed = [], []
    for flag, path in output_files(args):
        what, write = writers[flag]
        try:
            note = write(path) or ""
        except OSError as e:
            failed.append(f"{flag} {path}: cannot write it ({e.strerror or one_line(e)})")
        except ValueError as e:  # a layer the export cannot hold (checked on fresh observers before)
            failed.append(f"{flag} {path}: {one_line(e)}")
        else:
            wrote.append(f"wrote {what} to {path}{note}")
    return wrote, failed


def _compare(args, threads: int) -> int:
    from mono_quant import compare
    from mono_quant.calibration import engine

    kinds = observer_kinds(args.observer)
    device = parse_device(args.device)
    check_outputs(args)

    if args.model is None:
        from mono_quant import demo

        model = demo.demo_model()
        name = "demo"
        what = (
            f"demo transformer ({demo.LAYERS} blocks, hidden {demo.HIDDEN}, outlier channels "
            f"{', '.join(map(str, demo.OUTLIER_CHANNELS))})"
        )
    else:
        model = load_model(args.model)
        name = what = args.model
    calibration, held_out, source = read_batches(args, model)
    try:
        model.to(device)
        engine.target_modules(model)
    except ValueError as e:
        raise error(f"--model {name}: {e}") from None

    dtype = compare.DTYPES[args.dtype]
    for kind in kinds:  # settings an observer refuses (affine FP8, ...) end here, before any calibration
        try:
            compare.make_observer(kind, dtype, args.qscheme)
        except ValueError as e:
            raise error(f"--observer {kind} with --dtype {args.dtype}: {e}") from None
    check_exports(args, kinds, dtype)
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    try:
        cmp = compare.compare_observers(
            model, calibration, held_out, kinds, dtype, args.qscheme, device, progress=progress
        )
    except RuntimeError as e:  # the model failed on a batch: the data does not fit the model
        raise error(f"--model {name}: {one_line(e).removeprefix('RuntimeError: ')}") from None
    elapsed = time.perf_counter() - t0
    # written before anything is printed: a reader that stops early (| head) cannot lose them
    wrote, failed = _write_outputs(args, cmp, model, held_out, device, name)

    if not args.quiet:
        print(f"{what}: {source}; {args.dtype} {cmp.qscheme}; {device}")
        print("SQNR: held-out layer input fake-quantized with each observer's qparams, dB (higher is better)")
        print()
    print(compare.format_table(cmp))
    print()
    print(compare.format_summary(cmp))
    if not args.quiet:
        print(timing_line(elapsed, threads, device, args))
        for line in wrote:
            print(line)
    print(compare.winner_line(cmp))
    if failed:
        sys.stdout.flush()
        raise error("; ".join(failed))
    return 0


def _bench(argv: list[str]) -> int:
    from mono_quant import bench

    return bench.main(argv)


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    if args.command is None:
        raise CLIError(f"{PROG}: error: choose a command: calibrate or bench (try: {PROG} calibrate --help)")
    return _calibrate(args)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush at exit finds no broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (captured, replaced)
        pass


def main(argv: list[str] | None = None) -> int:
    """Run ``mono-quant``; returns the exit code.

    0 success; 2 bad arguments or an output that cannot be written (one line on stderr); 130 interrupted;
    ``EXIT_BROKEN_PIPE`` (141) when stdout was closed early (``mono-quant calibrate | head``): the rest of
    the output is dropped without a message, as Unix tools do.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            code = _run(argv)
        except CLIError as e:
            print(str(e), file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            code = 130
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return code
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
