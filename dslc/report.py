"""The fusion report: each region (ops, spec lines, bytes moved per row before and after) and each
candidate left unfused, with the reason. Printed by `dslc build --report` and `dslc show --fusion`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def fusion_tables(optimized) -> tuple[Table, Table]:
    report = optimized.report
    regions = Table(title="fused regions", title_justify="left")
    for col in ("region", "in module", "ops", "spec lines", "bytes/row before", "after", "saved"):
        regions.add_column(col, overflow="fold")
    for module, name, region, b in report.regions:
        ops = " ".join(o.op for o in region.ops)
        saved = f"{1 - b['after'] / b['before']:.0%}" if b["before"] else "-"
        regions.add_row(name, module, ops, region.source, f"{b['before']:,}", f"{b['after']:,}", saved)
    rejected = Table(title="not fused", title_justify="left")
    for col in ("in module", "at", "reason"):
        rejected.add_column(col, overflow="fold")
    for module, where, reason in report.rejected:
        rejected.add_row(module, where, reason)
    return regions, rejected


def print_fusion_report(optimized, console: Console | None = None) -> None:
    if console is None:
        import os

        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console.width = 160  # piped or captured: keep each region on one row
    regions, rejected = fusion_tables(optimized)
    console.print(regions)
    console.print(rejected)
    console.print(
        "bytes/row: an estimate per row of N values at 2 bytes per model-dtype value "
        "(4 for float32 ones), counting every op's reads and writes before fusion and the "
        "region's inputs and outputs after.",
        style="dim",
    )
