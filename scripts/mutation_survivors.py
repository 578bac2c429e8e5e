"""List the survivors of the last mutmut run, each with its reason, from the
mutmut cache (``mutants/``).  On demand, never in CI:

    mutmut run --max-children 2            # the mutation run ([tool.mutmut])
    python scripts/mutation_survivors.py   # counts + survivors, Markdown, stdout
    python scripts/mutation_survivors.py --write docs/mutation.md
    python scripts/mutation_survivors.py --unexplained   # survivors no rule explains

It reads ``mutants/udfc_ref/<module>.py.meta`` (``exit_code_by_key``: 1
killed, 0 survived, None not run, -24/24/36 timeout, 33 no test reaches the
function) and the mutated modules ``mutants/udfc_ref/<module>.py`` (each
mutant is a copy of its function next to ``<function>__mutmut_orig``), diffs
every surviving / not-run mutant against the original function, and explains
it with the first matching rule of ``RULES`` (function, removed line, added
line -> category and reason).  A survivor no rule matches is listed as
"unexplained", so a new survivor never slips through silently.  ``--write``
replaces the text between ``<!-- survivors:begin -->`` and
``<!-- survivors:end -->`` of the given file.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import re
import sys
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STATUS = {1: "killed", 3: "killed", 0: "survived", None: "not run", 33: "no test", 5: "no test",
          -24: "timeout", 24: "timeout", 36: "timeout", 152: "timeout", 255: "timeout", 37: "type check"}

# Categories, in the order they are printed.
EQUIV = "equivalent"
GAP_KILLED = "real gap, killed by a test added after the run"
GAP_OPEN = "real gap, open"
UNEXPLAINED = "unexplained"
CATEGORIES = [GAP_OPEN, GAP_KILLED, EQUIV, UNEXPLAINED]

#: (category, reason, function regex, removed-line regex, added-line regex); the
#: first rule whose three regexes all match (re.search) explains the survivor.
RULES: list[tuple[str, str, str, str, str]] = []


def rule(category, reason, func=r".", old=r".", new=r"."):
    RULES.append((category, reason, func, old, new))


def _functions(src: str) -> dict[str, str]:
    """name -> text of every ``def`` of a mutated module (the trampolines'
    copies of a function are all top-level or methods of one class)."""
    pat = re.compile(r"^([ \t]*)def (\w+)\(", re.M)
    ms = list(pat.finditer(src))
    out = {}
    for a, b in zip(ms, ms[1:] + [None]):
        lines = src[a.start():(b.start() if b else len(src))].splitlines()
        indent = len(a.group(1))
        # the function ends at the first later line indented no deeper than its ``def``
        # (decorators and the trampoline tables mutmut writes between functions)
        end = next((i for i, l in enumerate(lines) if i > 0 and l.strip() and not l.startswith(")")
                    and len(l) - len(l.lstrip()) <= indent), len(lines))
        out[a.group(2)] = "\n".join(lines[:end])
    return out


def _body(text: str) -> list[str]:
    """The function's lines after its signature (which may span lines)."""
    lines = text.splitlines()
    depth, i = 0, 0
    for i, line in enumerate(lines):
        depth += line.count("(") - line.count(")")
        if depth <= 0 and line.rstrip().endswith(":"):
            break
    body = lines[i + 1:]
    while body and not body[-1].strip():
        body.pop()
    return body


def mutant_diff(funcs: dict[str, str], name: str) -> tuple[list[str], list[str]]:
    """Removed and added lines (stripped) of mutant ``name`` against its original."""
    orig = re.sub(r"__mutmut_\d+$", "__mutmut_orig", name)
    a, b = _body(funcs[orig]), _body(funcs[name])
    removed, added = [], []
    for line in difflib.unified_diff(a, b, n=0, lineterm=""):
        if line.startswith(("---", "+++", "@@")):
            continue
        (removed if line[0] == "-" else added).append(line[1:].strip())
    return removed, added


def source_line(src_lines: list[str], removed: list[str], func: str) -> int | None:
    """1-based line of the first removed line in the original module, searched
    from the function's ``def``."""
    if not removed:
        return None
    start = next((i for i, l in enumerate(src_lines) if re.match(rf"\s*def {re.escape(func)}\(", l)), 0)
    for i in range(start, len(src_lines)):
        if src_lines[i].strip() == removed[0]:
            return i + 1
    return None


def explain(func: str, removed: list[str], added: list[str]) -> tuple[str, str]:
    old, new = "\n".join(removed), "\n".join(added)
    for cat, reason, f_re, o_re, n_re in RULES:
        if re.search(f_re, func) and re.search(o_re, old) and re.search(n_re, new):
            return cat, reason
    return UNEXPLAINED, "no rule yet: read it (`mutmut show <name>`) and add one"


def _short(lines: list[str], width: int = 110) -> str:
    s = " / ".join(lines) if lines else "(nothing)"
    return s if len(s) <= width else s[: width - 1] + "…"


def collect(root: str = ROOT):
    rows, counts = [], defaultdict(Counter)
    for meta_path in sorted(glob.glob(os.path.join(root, "mutants", "udfc_ref", "*.py.meta"))):
        module = os.path.basename(meta_path)[: -len(".py.meta")]
        codes = json.load(open(meta_path))["exit_code_by_key"]
        funcs = _functions(open(meta_path[: -len(".meta")]).read())
        src_lines = open(os.path.join(root, "udfc_ref", module + ".py")).read().splitlines()
        for key, code in codes.items():
            status = STATUS.get(code, f"exit {code}")
            counts[module][status] += 1
            if status == "killed":
                continue
            name = key.rsplit(".", 1)[1]
            func = re.sub(r"__mutmut_\d+$", "", name)
            func = func.split("ǁ")[-1] if "ǁ" in func else func[2:]  # x_name / xǁClassǁname
            removed, added = mutant_diff(funcs, name)
            cat, reason = explain(func, removed, added)
            rows.append(dict(key=key, module=module, func=func, status=status, line=source_line(src_lines, removed, func),
                             removed=removed, added=added, category=cat, reason=reason))
    return rows, counts


def markdown(rows, counts) -> str:
    out = []
    statuses = ["killed", "survived", "timeout", "not run", "no test"]
    out.append("| module | mutants | " + " | ".join(statuses) + " |")
    out.append("|---|---:|" + "---:|" * len(statuses))
    tot = Counter()
    for m in sorted(counts):
        c = counts[m]
        tot.update(c)
        out.append(f"| `{m}.py` | {sum(c.values())} | " + " | ".join(str(c.get(s, 0)) for s in statuses) + " |")
    out.append(f"| **all** | **{sum(tot.values())}** | " + " | ".join(f"**{tot.get(s, 0)}**" for s in statuses) + " |")
    out.append("")
    by_cat = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    for cat in CATEGORIES:
        rs = by_cat.get(cat)
        if not rs:
            continue
        out.append(f"### {cat[0].upper() + cat[1:]} ({len(rs)})")
        out.append("")
        by_reason = defaultdict(list)
        for r in rs:
            by_reason[r["reason"]].append(r)
        for reason, group in by_reason.items():
            out.append(f"**{reason}** ({len(group)})")
            out.append("")
            out.append("| mutant | status | line | original → mutant |")
            out.append("|---|---|---:|---|")
            for r in sorted(group, key=lambda r: (r["module"], r["line"] or 0, r["key"])):
                name = r["key"].replace("udfc_ref.", "")
                change = f"`{_short(r['removed'])}` → `{_short(r['added'])}`".replace("|", "\\|")
                out.append(f"| `{name}` | {r['status']} | {r['line'] or ''} | {change} |")
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", metavar="FILE", help="replace the survivors section of FILE")
    ap.add_argument("--unexplained", action="store_true", help="print only the survivors no rule explains")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    a = ap.parse_args(argv)
    if not glob.glob(os.path.join(ROOT, "mutants", "udfc_ref", "*.py.meta")):
        print("no mutmut cache in mutants/: run `mutmut run` first", file=sys.stderr)
        return 1
    rows, counts = collect()
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1, ensure_ascii=False)
    if a.unexplained:
        for r in rows:
            if r["category"] == UNEXPLAINED:
                print(f"{r['key']} [{r['status']}] {r['module']}.py:{r['line']}  {_short(r['removed'], 200)}  ->  "
                      f"{_short(r['added'], 200)}")
        return 0
    text = markdown(rows, counts)
    if a.write:
        doc = open(a.write).read()
        b, e = "<!-- survivors:begin -->", "<!-- survivors:end -->"
        if b not in doc or e not in doc:
            print(f"{a.write}: no {b} ... {e} section", file=sys.stderr)
            return 1
        head, rest = doc.split(b, 1)
        tail = rest.split(e, 1)[1]
        with open(a.write, "w") as f:
            f.write(head + b + "\n" + text + "\n" + e + tail)
    else:
        print(text)
    return 0


# ---------------------------------------------------------------- the reasons
# Checked one by one against the survivors of the run in docs/mutation.md.
# Generic NumPy equivalences first, then module-specific ones.

rule(EQUIV, "`astype(None)` is `astype(float64)`; the value is float64 either way",
     old=r"astype\(np\.float64\)", new=r"astype\(None\)")
rule(EQUIV, "`astype(None)` (float64) instead of an integer dtype: the values are small integers, "
     "exact in float64, and are cast to the final integer dtype right after",
     func=r"pack_codes|unpack_codes", old=r"astype\(np\.int16\)", new=r"astype\(None\)")
rule(EQUIV, "`dtype=None`: the argument is float64 already (every caller passes float64 arrays)",
     old=r"dtype=np\.float64", new=r"dtype=None|asarray\([a-z_]+, \)")
rule(EQUIV, "NumPy reads any negative size in `reshape` as 'infer', and `reshape(None)` of a flat "
     "array as the identity", old=r"reshape\(", new=r"reshape\([^)]*(-2|None)")
rule(EQUIV, "einsum subscripts are case-insensitive labels: upper case is the same contraction",
     old=r"einsum\(\"[a-z,>-]+\"", new=r"einsum\(\"[A-Z,>-]+\"")
rule(EQUIV, "`np.packbits(..., axis=None)` of an (n, 8) bit array packs the same bytes in the same order",
     func=r"unpack_codes", old=r"packbits\(full, axis=1\)", new=r"packbits\(full, (axis=None)?\)")

if __name__ == "__main__":
    sys.exit(main())
