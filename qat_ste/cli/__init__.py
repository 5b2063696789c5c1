"""The ``qat-ste`` command line.

    qat-ste convert --out runs/quickstart                 # digits + zoo:lenet5, about a minute on a CPU
    qat-ste convert --model torchvision:resnet18 --data cifar10:~/data/cifar --weights r18.pt --out runs/r18
    qat-ste export --checkpoint runs/r18/qat/best.pt --out r18_int8.onnx --weight-format int8
    qat-ste check --onnx runs/r18/model.onnx --checkpoint runs/r18/qat/last.pt --json
    qat-ste list-stes | list-models

Every bad input ends with a one-paragraph message on stderr (the problem and the fix) and exit
code 2; ``check`` exits 1 when the file fails its parity thresholds, ``convert`` exits 1 when
training diverges, 130 when stopped by Ctrl-C (SIGINT) and 143 when stopped by SIGTERM (both
save a checkpoint to ``--resume`` from). Nothing is written over a run in ``--out`` or an existing
export file without ``--resume``/``--overwrite``. Set ``QAT_STE_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import QatSteError
from .convert import EXIT_SIGINT, EXIT_SIGTERM, _convert
from .export_check import _check, _export
from .lists import _list_models, _list_stes
from .output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, _fail
from .parser import DEFAULT_DATA, DEFAULT_MODEL, _check_positive, build_parser
from .quant_options import QUANT_OPTIONS, quant_from_plain
from .sources import CONVERT_FORMAT

__all__ = ["COMMANDS", "CONVERT_FORMAT", "DEFAULT_DATA", "DEFAULT_MODEL", "EXIT_FAILED", "EXIT_OK", "EXIT_SIGINT",
           "EXIT_SIGTERM", "EXIT_USAGE", "QUANT_OPTIONS", "build_parser", "main", "quant_from_plain"]


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert": _convert, "export": _export, "check": _check, "list-stes": _list_stes, "list-models": _list_models,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qat-ste`` command line; returns the exit code: 0 ok, 1 failed check or run (or an internal
    error, reported as a bug), 2 bad input or environment, 130/143 stopped by SIGINT/SIGTERM."""
    debug = os.environ.get("QAT_STE_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(list(argv) if argv is not None else None)
        threads = getattr(args, "threads", None)
        if threads is not None:
            _check_positive("--threads", threads)
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return COMMANDS[args.command](args)
            finally:
                torch.set_num_threads(previous)
        return COMMANDS[args.command](args)
    except SystemExit as stop:  # --help
        return int(stop.code or 0) if not isinstance(stop.code, str) else EXIT_USAGE
    except QatSteError as error:
        if debug:
            raise
        from ..train.engine import TrainingDiverged

        _fail(error.problem, error.fix)
        return EXIT_FAILED if isinstance(error, TrainingDiverged) else EXIT_USAGE
    except KeyboardInterrupt:
        print("qat-ste: interrupted", file=sys.stderr)
        return 130
    except ImportError as error:
        if debug:
            raise
        if (error.name or "").split(".")[0] == "qat_ste":  # our own import failed: not the user's set-up
            return _internal_error(error)
        _fail(f"a required package is missing ({error})",
              "install the extras: pip install 'qat_ste[onnx,timm,data,plot]'")
        return EXIT_USAGE
    except OSError as error:  # the environment: paths, permissions, disk space
        if debug:
            raise
        _fail(f"{type(error).__name__}: {_first_line(error)[:400]}",
              "check the paths, their permissions and the free disk space; set QAT_STE_DEBUG=1 to see the traceback")
        return EXIT_USAGE
    except Exception as error:  # noqa: BLE001 - anything else is ours: say so, briefly
        if debug:
            raise
        return _internal_error(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _internal_error(error: Exception) -> int:
    """An error qat_ste did not turn into a clear message: exit 1, never blamed on the user's input."""
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        _fail(f"out of memory: {_first_line(error)[:300]}",
              "lower --batch-size (or --image-size), or use a larger device")
        return EXIT_FAILED
    print(f"qat-ste: internal error: {type(error).__name__}: {_first_line(error)[:400]}\n"
          "  This is a bug in qat_ste (or an input it fails to check). Please report it with the traceback "
          "that QAT_STE_DEBUG=1 shows.", file=sys.stderr)
    return EXIT_FAILED
