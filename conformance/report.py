"""The conformance report: JSON Lines (one CaseRecord per line) and a markdown summary beside it."""
from __future__ import annotations

import collections
import pathlib

from .records import CaseRecord

FAILED = ("fail", "error")


def write_jsonl(records: list[CaseRecord], path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.to_json() + "\n" for r in records))


def read_jsonl(path: pathlib.Path) -> list[CaseRecord]:
    return [CaseRecord.from_json(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def summary_markdown(records: list[CaseRecord], title: str) -> str:
    head = records[0] if records else None
    lines = [f"# {title}", ""]
    if head:
        lines += [f"- device: {head.device}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in head.versions.items()), ""]
    counts = collections.Counter(r.status for r in records)
    lines += [f"**{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, {counts['skip']} "
              f"skipped** of {len(records)} records.", ""]
    lines += ["| section | op | provider | pass | fail | error | skip | worst max abs | worst similarity "
              "| deterministic | batch-invariant | transport |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r.section, r.op, r.provider)].append(r)
    for (section, op, prov), rs in groups.items():
        c = collections.Counter(r.status for r in rs)
        ran = [r for r in rs if r.status in ("pass", "fail")]
        max_abs = max((r.max_abs for r in ran if r.max_abs is not None), default=None)
        sim = min((r.similarity for r in ran if r.similarity is not None), default=None)
        det = [r.deterministic for r in ran if r.deterministic is not None]
        inv = [r.batch_invariant for r in ran if r.batch_invariant is not None]
        transports = sorted({r.transport for r in rs if r.transport})
        lines.append(f"| {section} | {op} | {prov} | {c['pass']} | {c['fail']} | {c['error']} | {c['skip']} | "
                     f"{_fmt(max_abs)} | {_fmt(sim, '.8f')} | {'yes' if det and all(det) else ('no' if det else '-')} | "
                     f"{'yes' if inv and all(inv) else ('no' if inv else '-')} | {', '.join(transports) or '-'} |")
    bad = [r for r in records if r.status in FAILED]
    if bad:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r.case_id}` ({r.provider}, {r.status}): {r.message}" for r in bad]
    skipped = [r for r in records if r.status == "skip"]
    if skipped:
        lines += ["", "## Skipped (the provider declined the case)", ""]
        lines += [f"- `{r.case_id}` ({r.provider}): {r.message}" for r in skipped]
    return "\n".join(lines) + "\n"


def write_report(records: list[CaseRecord], out: pathlib.Path, title: str) -> pathlib.Path:
    """Write out (JSONL) and the markdown summary beside it (same name, .md); returns the summary path."""
    out = pathlib.Path(out)
    write_jsonl(records, out)
    md = out.with_suffix(".md")
    md.write_text(summary_markdown(records, title))
    return md
