"""What ``mono-quant calibrate`` reads and writes, checked before it calibrates: the observer names, the
device, the model (``module:factory``), the data file, the batches, the output files and the thread count.
Each check raises ``CLIError`` with one line saying what is wrong and what is allowed."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import os
import re
import sys
import time

from mono_quant.args import CLIError, observer_kind, one_line

PROG = "mono-quant"
DEFAULT_BATCHES = 16


def error(message: str) -> CLIError:
    return CLIError(f"{PROG} calibrate: error: {message}")


def observer_kinds(text: str) -> list[str]:
    from mono_quant.compare import COMPARED

    if text.strip().lower() == "all":
        return list(COMPARED)
    kinds = []
    for name in text.split(","):
        try:
            key = observer_kind(name)
        except ValueError as e:
            raise error(f"--observer: {e}, or all") from None
        if key not in kinds:
            kinds.append(key)
    return kinds


def parse_device(text: str):
    import torch

    allowed = "use auto, cpu, cuda, cuda:N or mps"
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise error(f"--device {text!r} is not a device name; {allowed}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"--device {text}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise error(f"--device {text}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise error(f"--device {text}: MPS is not available on this machine; use --device cpu")
        return dev
    raise error(f"--device {text}: device type {dev.type!r} is not supported; {allowed}")


def export_targets(args) -> list[tuple[str, str]]:
    """``(format, path)`` of every ``--export FORMAT:PATH``."""
    from mono_quant.export import FORMATS

    out = []
    for text in getattr(args, "export", None) or []:
        fmt, sep, path = text.partition(":")
        if not sep or not path:
            raise error(f"--export {text!r}: expected FORMAT:PATH, e.g. tensorrt:calib.cache")
        if fmt not in FORMATS:
            raise error(f"--export {text}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        out.append((fmt, path))
    return out


def output_files(args) -> list[tuple[str, str]]:
    """``(flag, path)`` of every output file asked for (``--export FORMAT`` for each export)."""
    wanted = [("--save", args.save), ("--save-state", args.save_state), ("--plot", args.plot)]
    wanted += [(f"--export {fmt}", path) for fmt, path in export_targets(args)]
    return [(flag, path) for flag, path in wanted if path is not None]


def check_exports(args, kinds, dtype) -> None:
    """Each ``--export`` format can hold the qparams of an observer ``--export-observer`` picks: checked
    on fresh observers of ``kinds`` before calibrating (every layer's observers share these settings)."""
    from mono_quant import compare
    from mono_quant.export import check_observers

    targets = export_targets(args)
    if not targets:
        return
    choice = args.export_observer
    if choice != "best":
        try:
            choice = observer_kind(choice)
        except ValueError as e:
            raise error(f"--export-observer: {e}, or best") from None
        if choice not in kinds:
            calibrated = ", ".join(kinds)
            raise error(f"--export-observer {choice}: not among the observers calibrated ({calibrated})")
    row = {kind: compare.make_observer(kind, dtype, args.qscheme) for kind in kinds}
    for fmt, path in targets:
        try:
            check_observers(fmt, row, choice)
        except ValueError as e:
            raise error(f"--export {fmt}:{path}: {e}") from None


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same real path (symlinks resolved), or the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(args) -> None:
    """Every output can be written, none is ``--data`` or another output, and ``--plot`` has a format
    matplotlib writes: checked before calibrating, without changing any file."""
    from mono_quant import io, plot

    outputs = output_files(args)
    named = ([("--data", args.data)] if args.data is not None else []) + outputs
    for i, (flag, path) in enumerate(named):
        if flag == "--data":
            continue
        for other_flag, other in named[:i]:
            if same_file(path, other):
                why = (
                    "it would overwrite the calibration data"
                    if other_flag == "--data"
                    else "give each its own file"
                )
                raise error(f"{flag} {path} is the same file as {other_flag} {other}: {why}")
        try:
            io.check_writable(path)
        except OSError as e:
            raise error(f"{flag} {path}: {e.strerror}") from None
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise error("--plot needs matplotlib, which is not installed: pip install 'mono_quant[plot]'")
        fmt, formats = plot.plot_format(args.plot), plot.plot_formats()
        if fmt not in formats:
            raise error(
                f"--plot {args.plot}: matplotlib cannot write .{fmt} files; end the name with one of: "
                f"{', '.join('.' + f for f in formats)}"
            )


def load_model(spec: str):
    from torch import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"--model {spec!r}: expected package.module:factory, e.g. mypkg.models:build_model")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules in the current folder import
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise error(
            f"--model {spec}: cannot import {module_name!r} ({one_line(e)}); is it on PYTHONPATH?"
        ) from None
    except Exception as e:
        raise error(f"--model {spec}: importing {module_name!r} raised {one_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"--model {spec}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise error(
            f"--model {spec}: {attr!r} is a {type(obj).__name__}, expected a callable returning an nn.Module"
        )
    try:
        model = obj()
    except Exception as e:
        raise error(f"--model {spec}: calling {attr}() raised {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise error(f"--model {spec}: {attr}() returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def _valid_batch(b) -> bool:
    import torch

    if isinstance(b, torch.Tensor):
        return True
    if isinstance(b, dict):
        return all(isinstance(k, str) for k in b)
    return isinstance(b, (list, tuple))


def _refused_globals(path: str, error: Exception) -> list[str]:
    """The classes and functions a ``weights_only`` load refused in ``path`` (read without unpickling)."""
    import torch

    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if find is not None:
        try:
            return list(find(path))
        except Exception:
            pass
    return re.findall(r"GLOBAL ([\w.]+)", str(error))


def load_data(path: str) -> list:
    import pickle

    import torch

    if not os.path.exists(path):
        raise error(f"--data {path}: no such file")
    if os.path.isdir(path):
        raise error(f"--data {path}: is a folder; give a file written by torch.save")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = _refused_globals(path, e) if isinstance(e, pickle.UnpicklingError) else []
        encoding = [g for g in refused if g.rsplit(".", 1)[-1] == "BatchEncoding"]
        if encoding:
            raise error(
                f"--data {path}: holds a tokenizer's BatchEncoding ({encoding[0]}), which "
                "torch.load(weights_only=True) does not load (unpickling it could run code); save dict(enc) "
                "instead: torch.save([dict(enc) for enc in encodings], path)"
            ) from None
        if refused:
            raise error(
                f"--data {path}: holds {', '.join(refused)} objects, which torch.load(weights_only=True) "
                "does not load (unpickling them could run code); save tensors, or lists, tuples or dicts of "
                "tensors (dict(obj) for a dict-like object)"
            ) from None
        raise error(f"--data {path}: torch.load(weights_only=True) cannot read it ({one_line(e)})") from None
    expected = "a tensor, a list of tensors, or a list of dict batches"
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)) and obj and all(_valid_batch(b) for b in obj):
        return list(obj)
    what = "an empty list" if isinstance(obj, (list, tuple)) and not obj else f"a {type(obj).__name__}"
    raise error(f"--data {path}: holds {what}; expected {expected}")


# --- calibrate ---------------------------------------------------------------------------------------------


def read_batches(args, model) -> tuple[list, object, str]:
    """``(calibration batches, held-out batch, description)`` from --data, the model, or the demo."""
    if args.data is not None:
        data = load_data(args.data)
        if len(data) == 1:
            if args.batches not in (None, 1):
                raise error(f"--batches {args.batches}: {args.data} holds 1 batch")
            return data, data[0], f"1 batch from {args.data} (SQNR measured on it: no batch left to hold out)"
        n = len(data) - 1
        if args.batches is not None and args.batches > n:
            raise error(
                f"--batches {args.batches}: {args.data} holds {len(data)} batches, so at most {n} for "
                "calibration (the last is held out for the SQNR)"
            )
        n = args.batches or n
        return data[:n], data[-1], f"{n} batches from {args.data} + the last one held out"
    n = args.batches or DEFAULT_BATCHES
    example = getattr(model, "example_inputs", None)
    if not callable(example):
        raise error(
            f"--model {args.model}: no calibration data; pass --data FILE.pt (a tensor, a list of tensors or "
            "a list of dict batches) or give the model an example_inputs(num_batches) method"
        )
    try:
        # at most n + 1 batches are read: example_inputs may return an endless generator
        data = list(itertools.islice(example(n + 1), n + 1))
    except Exception as e:
        raise error(f"--model {args.model}: example_inputs({n + 1}) raised {one_line(e)}") from None
    if len(data) < 2:
        raise error(
            f"--model {args.model}: example_inputs({n + 1}) returned {len(data)} batches, expected {n + 1}"
        )
    return data[:-1], data[-1], f"{len(data) - 1} batches from example_inputs() + 1 held out"


def idle_cpus(window: float = 0.1) -> float | None:
    """How many CPUs stood idle over the next ``window`` seconds (``/proc/stat``; ``None`` where there is
    none). Unlike the load average, it does not count the run that just ended."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:  # "cpu  user nice system idle iowait irq softirq steal ..."
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return ticks[3] + ticks[4], sum(ticks)

    try:
        idle0, total0 = sample()
        time.sleep(window)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def default_threads(args) -> int:
    """The torch thread count when ``--threads`` is not given.

    The demo: 1 (its tensors are small; more threads only wait for each other). A user model: torch's
    count, but no more than the CPUs idle right now (``idle_cpus``), at least 1: OpenMP workers that wait
    for CPUs other processes hold make calibration several times slower than fewer threads would.
    """
    import torch

    if args.model is None:
        return 1
    threads = torch.get_num_threads()
    idle = idle_cpus()
    return threads if idle is None else max(1, min(threads, math.floor(idle + 0.5)))


def timing_line(elapsed: float, threads: int, device, args) -> str:
    """The line that says how long calibrating and scoring took (with the thread count, for a user model
    on the CPU, where it matters)."""
    line = f"calibration and scoring took {elapsed:.2f} s"
    if args.model is None or getattr(device, "type", "cpu") != "cpu":
        return line
    if args.threads is not None:
        return f"{line} with {threads} torch thread{'s' if threads > 1 else ''} (--threads)"
    return (
        f"{line} with {threads} torch thread{'s' if threads > 1 else ''} (as many as CPUs were idle, "
        "at most torch's default; --threads N chooses: on a busy machine fewer can be several times faster)"
    )
