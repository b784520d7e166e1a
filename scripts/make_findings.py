"""Collect the studies' outputs into ``docs/findings.md``: a summary of the verdicts, then each
study's results.md (paper finding, verdict, table, command), its plots copied to
``docs/images/studies/<study>/``, a reading of the result from ``--notes/<study>.md`` when there
is one, and the wall clock and CPU time of each study from its log.

    python scripts/make_findings.py --studies runs/studies --intro docs/findings_intro.md
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

ORDER = ["vae_robustness", "first_block", "steps_cfg", "block_size", "loc_dim", "stage2_modes", "cola_ar_mdm",
         "patch_parity", "levers"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", default="runs/studies")
    p.add_argument("--out", default="docs/findings.md")
    p.add_argument("--intro", default=None, help="markdown placed before the studies")
    p.add_argument(
        "--notes", default="docs/findings_notes", help="folder of <study>.md readings added to the sections"
    )
    args = p.parse_args(argv)
    root, out = Path(args.studies), Path(args.out)
    images = out.parent / "images" / "studies"
    times = {}
    for log in root.glob("*.log"):
        m = re.search(r"^(\w+): ([\d.]+) s wall, ([\d.]+) s user$", log.read_text(), re.M)
        if m:
            times[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    parts = [Path(args.intro).read_text().rstrip() + "\n"] if args.intro else []
    summary = ["| study | the paper | here (the verdicts of the section) |", "|---|---|---|"]
    for name in ORDER:
        path = root / name / "results.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            md = (root / name / "results.md").read_text()
            paper = re.search(r"\*\*Paper:\*\* (.*)", md).group(1)
            verdicts = re.findall(r"\*\*(.+?)\*\*", saved["verdict"]) or [saved["verdict"]]
            short = (
                Path(args.notes) / f"{name}.summary"
            )  # a one-line summary, when the bold words need context
            if short.is_file():
                verdicts = [short.read_text().strip()]
            anchor = re.sub(r"[^a-z0-9 -]", "", saved["title"].lower()).replace(" ", "-")
            summary.append(f"| [{saved['title']}](#{anchor}) | {paper} | {'; '.join(verdicts)} |")
    parts.append("## Summary\n\n" + "\n".join(summary) + "\n")
    for name in ORDER:
        md_path = root / name / "results.md"
        if not md_path.is_file():
            continue
        md = md_path.read_text()
        (images / name).mkdir(parents=True, exist_ok=True)
        for png in (root / name).glob("*.png"):
            shutil.copy(png, images / name / png.name)
            md = md.replace(f"]({png.name})", f"](images/studies/{name}/{png.name})")
        note = Path(args.notes) / f"{name}.md"
        if note.is_file():  # a reading of the result, written by whoever ran the study
            md = md.rstrip() + "\n\n**Reading.** " + note.read_text().strip() + "\n"
        if name in times:
            wall, user = times[name]
            md = md.rstrip() + f"\n\nRun time: {wall / 60:.1f} min wall clock ({user / 60:.1f} CPU-min).\n"
        parts.append(md)
    if times:
        total = sum(w for w, _ in times.values())
        parts.append(f"Total wall clock of the studies above: {total / 60:.0f} min on 2 CPU cores.\n")
    out.write_text("\n".join(parts))
    print(f"wrote {out} ({len(parts)} sections)")


if __name__ == "__main__":
    main()
