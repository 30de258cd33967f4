"""The graftkit demo: run every plugin's quick end-to-end example and collect one Markdown report.

Each example is a standalone script that accepts ``--quick`` (a few-minute run on embedded default data)
and ``--out DIR``, and writes ``DIR/report.md`` plus its plots. This script runs the ones that exist,
one after another in fresh processes, and stitches their reports into ``<out>/report.md``.

    python examples/reproduce.py                  # quick mode, all plugins
    python examples/reproduce.py --only pml mdn   # a subset
    python examples/reproduce.py --full           # the full protocols (hours on a CPU)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

EXAMPLES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Demo:
    key: str
    title: str
    script: str


DEMOS = (
    Demo("pml", "SoftTriple loss in pytorch-metric-learning", "softtriple_retrieval.py"),
    Demo("pcl", "Prototypical Contrastive Learning in Lightly", "pcl_fashion_mnist.py"),
    Demo("pyg", "Energy-based scene-graph learning in torch-geometric", "ebm_scene_graphs.py"),
    Demo("mdn", "Metadata Normalization in timm", "mdn_synthetic.py"),
    Demo("gzsl", "Disentangled-VAE for generalized zero-shot learning", "gzsl_benchmark.py"),
)


def run_demo(demo: Demo, out_dir: Path, full: bool) -> tuple[bool, float, str]:
    """Run one example in a subprocess; return (succeeded, seconds, report markdown)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(EXAMPLES_DIR / demo.script), "--out", str(out_dir)]
    if not full:
        cmd.append("--quick")
    tqdm.write(f"$ {' '.join(cmd)}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    seconds = time.perf_counter() - start
    report_file = out_dir / "report.md"
    report = report_file.read_text() if report_file.is_file() else "_no report written_\n"
    return proc.returncode == 0, seconds, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)"
    )
    parser.add_argument("--only", nargs="+", choices=[d.key for d in DEMOS], help="run only these plugins")
    parser.add_argument("--full", action="store_true", help="run the full protocols instead of quick mode")
    args = parser.parse_args(argv)

    selected = [d for d in DEMOS if (args.only is None or d.key in args.only)]
    available = [d for d in selected if (EXAMPLES_DIR / d.script).is_file()]
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    sections = []
    summary = ["| plugin | example | status | wall time (s) |", "|---|---|---|---|"]
    failures = 0
    for demo in tqdm(available, desc="graftkit demo", unit="plugin"):
        ok, seconds, report = run_demo(demo, out / demo.key, args.full)
        failures += not ok
        status = "ok" if ok else "FAILED"
        summary.append(f"| {demo.title} | `examples/{demo.script}` | {status} | {seconds:.1f} |")
        body = report.replace("](", f"]({demo.key}/") if "](" in report else report
        sections.append(f"## {demo.title}\n\n{body.strip()}\n")
    mode = "full" if args.full else "quick"
    header = f"# graftkit demo report ({mode} mode)\n\n" + "\n".join(summary) + "\n"
    (out / "report.md").write_text(header + "\n" + "\n".join(sections))
    print(f"\nReport: {out / 'report.md'}")
    print(f"Plots and per-plugin reports: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
