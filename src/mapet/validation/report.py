"""The validation result as JSON (for machines and DVC), HTML (for people) and a terminal summary."""

from __future__ import annotations

import html
from dataclasses import asdict
from pathlib import Path

from mapet import files
from mapet.validation import RuleResult

SHOWN_OFFENDERS = 20


def write_json(results: list[RuleResult], dataset: Path, path: Path) -> None:
    document = {"dataset": str(dataset), "success": all(r.success for r in results),
                "rules_failed": sum(not r.success for r in results), "rules": [asdict(r) for r in results]}
    files.write_json(path, document)


def write_html(results: list[RuleResult], dataset: Path, path: Path) -> None:
    passed = all(r.success for r in results)
    rows = []
    for result in results:
        shown = ", ".join(html.escape(o) for o in result.offenders[:SHOWN_OFFENDERS])
        more = result.failed - min(result.failed, SHOWN_OFFENDERS)
        offenders = f"{shown}{f' … and {more} more' if more else ''}" if result.failed else ""
        status = "pass" if result.success else "FAIL"
        rows.append(f'<tr class="{status.lower()}"><td>{status}</td><td>{html.escape(result.rule)}</td>'
                    f"<td>{result.failed}</td><td>{offenders}</td></tr>")
    verdict = "passes every rule" if passed else f"fails {sum(not r.success for r in results)} rule(s)"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Data validation: {html.escape(str(dataset))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
tr.fail td:first-child {{ color: #b00; font-weight: bold; }} tr.pass td:first-child {{ color: #070; }}
</style></head><body>
<h1>Data validation</h1>
<p>Dataset <code>{html.escape(str(dataset))}</code> {verdict}.</p>
<table><tr><th>result</th><th>rule</th><th>offending</th><th>which (images by source path and key; paths relative to the import's source folder)</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    files.write_text(path, page)


def summary(results: list[RuleResult], dataset: Path) -> str:
    failed = [r for r in results if not r.success]
    if not failed:
        return f"{dataset}: passes all {len(results)} validation rules"
    lines = [f"{dataset}: fails {len(failed)} of {len(results)} validation rules"]
    for result in failed:
        shown = ", ".join(result.offenders[:5]) + (" …" if result.failed > 5 else "")
        lines.append(f"  FAIL {result.rule}: {result.failed} offending ({shown})")
    return "\n".join(lines)
