"""Fixed-bucket histograms for Prometheus export (sans-IO, bounded memory).

Theory of operation
  A `Histogram` has a fixed, sorted tuple of finite upper bounds chosen at
  construction; `observe(v)` adds one to the first bucket whose bound is
  >= v (or to the implicit +Inf bucket) and adds v to the sum. Memory is one
  int per bucket plus the sum, whatever the number of observations: no
  per-flow or per-sample storage, so cardinality and memory stay bounded.

  Counts are kept per bucket (not cumulative) so that `observe` is one bisect
  and one increment; `cumulative()` produces the Prometheus `le` series.

  Workers publish histograms to the supervisor as unsigned 64-bit words
  (`to_words`: bucket counts, then +Inf, then the sum in integer
  micro-units) and the supervisor adds them up (`add_words`): the same
  layout metrics.SharedCounters uses for counters. The sum in micro-units
  (microseconds for seconds) loses nothing a scrape cares about.
"""

import bisect
import math

SUM_SCALE = 1_000_000   # to_words stores the sum as round(sum * SUM_SCALE)


class Histogram:
    """Counts of observations in fixed buckets.

    Parameters
      bounds  increasing finite upper bounds (`le` values); +Inf is implicit.
    Raises ValueError for empty, unsorted, duplicate or non-finite bounds.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(not math.isfinite(b) for b in bounds) \
                or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError("histogram bounds must be finite and strictly increasing")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # last: +Inf
        self.sum = 0.0

    @property
    def count(self):
        return sum(self.counts)

    @property
    def n_words(self):
        return len(self.counts) + 1

    def observe(self, value):
        """Add one observation. NaN is ignored; negative values land in the first bucket."""
        if value != value:
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self):
        """[(le, cumulative count)] including ("+Inf", total), as Prometheus wants."""
        out, total = [], 0
        for le, n in zip(self.bounds + (math.inf,), self.counts):
            total += n
            out.append((le, total))
        return out

    def merge(self, other):
        """Add another histogram with the same bounds into this one."""
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different bounds")
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum

    def to_words(self):
        """Counts (+Inf last) then the sum as round(sum * SUM_SCALE), all >= 0."""
        return list(self.counts) + [max(0, round(self.sum * SUM_SCALE))]

    def add_words(self, words):
        """Add a `to_words` list from another process (same bounds) into this one."""
        if len(words) != self.n_words:
            raise ValueError(f"expected {self.n_words} words, got {len(words)}")
        for i in range(len(self.counts)):
            self.counts[i] += words[i]
        self.sum += words[-1] / SUM_SCALE

    def render(self, name, labels=""):
        """Prometheus text lines (no HELP/TYPE) for this histogram.

        `labels` is an already formatted label list without braces, e.g.
        'transceiver="tx1"', or "".
        """
        sep = "," if labels else ""
        lines = []
        for le, n in self.cumulative():
            le_text = "+Inf" if le == math.inf else _fmt(le)
            lines.append(f'{name}_bucket{{{labels}{sep}le="{le_text}"}} {n}')
        brace = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{brace} {_fmt(self.sum)}")
        lines.append(f"{name}_count{brace} {self.count}")
        return lines


def _fmt(x):
    return repr(float(x)) if x != int(x) else str(int(x)) if abs(x) < 1e15 else repr(float(x))


def header(name, help_text, kind="histogram"):
    """The `# HELP` and `# TYPE` lines for a metric family."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
