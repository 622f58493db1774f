"""A Markdown digest of finished runs (docs/RESULTS.md): per recipe, what was found, changed and measured.

    python -m mechanic.report.markdown runs/full/* > docs/RESULTS.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ci(c: dict) -> str:
    return f"{c['mean']:.4g} [{c['lo']:.3g}, {c['hi']:.3g}]"


def _rows(ev: dict, kinds=("target", "side")) -> list[str]:
    out = ["| row | kind | n | before | after | change | p |", "|---|---|---|---|---|---|---|"]
    for r in ev["rows"]:
        if r["kind"] in kinds:
            out.append(f"| {r['id']} | {r['kind']} ({r['better']}) | {r['n']} | {_ci(r['before'])} | "
                       f"{_ci(r['after'])} | {_ci(r['delta'])} | {r['p']:.3g} |")
    return out


def digest(run_dir: Path) -> str:
    """One section for one run directory."""
    r = json.loads((run_dir / "results.json").read_text())
    s, man = r["summary"], r["manifest"]
    seconds = sum(v for v in man["timings"].values())
    lines = [f"## {s['title']}", "",
             f"Recipe `{r['recipe']['name']}` on {man['model']['name']} (fingerprint `{man['model']['fingerprint']}`), "
             f"size {man['size'] or 'full'}, seed {r['recipe']['seed']}, {seconds:.0f} s on this machine "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in man['timings'].items())}). "
             f"Verdict: **{'helped' if s['helped'] else 'did not clearly help'}**.", "",
             f"- **Located:** {s['located']}", f"- **Changed:** {s['changed']}", "", *_rows(r["evaluation"]), ""]
    if "control" in r:
        lines += ["Control (same measures, control plan):", "", *_rows(r["control"], ("target",)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    dirs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    sys.stdout.write("\n".join(digest(d) for d in dirs if (d / "results.json").is_file()))


if __name__ == "__main__":
    main()
