"""``python -m simulations CONFIG.yaml --out DIR`` (also ``modelmesh simulate``).

Exit status: 0 on success, 2 for a bad config or trace (one line on stderr
naming the field or the file and line), 1 when the report cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulations.config import ConfigError, load_config


def build_parser(prog: str = "python -m simulations") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Simulate placement policies over a workload and compare them.",
    )
    p.add_argument("config", help="YAML config (see simulations/README.md)")
    p.add_argument("--out", required=True, help="directory for results.json, results.md, plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the simulator CLI; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors
        return int(e.code or 0)
    try:
        cfg = load_config(args.config)
        from simulations.report import write_report
        from simulations.runner import run_config

        models, trace, results = run_config(
            cfg, progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr)
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        written = write_report(out, cfg, models, trace, results, plots=not args.no_plots)
    except OSError as e:
        print(f"error: cannot write the report to {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(
            f"error: the plots need matplotlib ({e}); install it with "
            "pip install 'pymodelmesh[sim]', or pass --no-plots",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write((out / "results.md").read_text())
    print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
