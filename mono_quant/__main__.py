"""``python -m mono_quant``: the ``mono-quant`` command."""

from mono_quant.cli import main

raise SystemExit(main())
