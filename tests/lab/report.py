"""The fault suite's figures: one ``FaultRecord`` per fault, and the Markdown table the suite ends with."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FaultRecord:
    """One fault's figures, summed over its runs. ``recovery_seconds`` holds one entry per run that recovered."""

    fault: str
    runs: int = 0
    packets_sent: int = 0
    packets_lost: int = 0
    allocations_lost: int = 0
    allocations_duplicated: int = 0
    recovery_seconds: list[float] = field(default_factory=list)
    notes: str = ""

    def row(self) -> str:
        times = sorted(self.recovery_seconds)
        recovery = f"{times[-1]:.1f} ({times[len(times) // 2]:.1f})" if times else "-"
        return (f"| {self.fault} | {self.runs} | {self.packets_sent} | {self.packets_lost} | {self.allocations_lost}"
                f" | {self.allocations_duplicated} | {recovery} | {self.notes} |")


HEADER = ("| fault | runs | packets sent | packets lost | allocations lost | allocations duplicated"
          " | recovery s, worst (median) | notes |\n|---|---|---|---|---|---|---|---|")


def table(records: list[FaultRecord]) -> str:
    return "\n".join([HEADER, *(r.row() for r in records)])
