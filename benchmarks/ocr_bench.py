"""kimivl's OCR and the no-model peers scored by olmOCR-Bench's own code, side by side in one run.

    .venv/bin/python benchmarks/ocr_bench.py [--json] [--bench DIR] [--work DIR] [--systems NAME ...]

1. The scorer: `olmocr` 0.4.27 from the package index, installed `--no-deps` with only what
   `olmocr/bench/benchmark.py` and `tests.py` import, into its own virtual environment
   ($KIMIVL_CACHE/ocr-bench/env; created on first use, or see `--no-install`). Its math checks
   render LaTeX with KaTeX in a headless Chromium: Debian's `chromium` package is used through
   Playwright (no browser download). Without Chromium the math checks are left out, with a note.
2. Each system writes its Markdown for every page of the sample's PDFs in the layout the scorer
   reads (`WORK/<system>/<pdf stem>_pg<N>_repeat1.md`):
   - olmocr_anchor: olmOCR's own outputs shipped with the sample (must score 0.943: proves the wiring);
   - kimivl_text: `kimivl ocr --method text --jsonl` over the sample folder (no model);
   - pymupdf_text: PyMuPDF's plain `page.get_text()`;
   - pymupdf4llm_layout / pymupdf4llm_heuristic: PyMuPDF 2.0's `to_markdown` with its layout
     models (onnxruntime) and without them, running headers and footers off;
   - pdftotext: poppler's `pdftotext` (Debian `poppler-utils`), skipped where missing.
3. `python -m olmocr.bench.benchmark --dir WORK`, unmodified, scores every system. Its printed
   per-JSONL counts give the official overall (the mean of the per-file pass rates: dataset,
   blanks and the baseline checks it adds per PDF); `evaluate_candidate`'s results are kept per
   check in `WORK/results/<system>.jsonl`.

Reported per system: `official` (olmOCR-Bench's overall), `checks` (passed of the sample's 100),
`by_type` (passed/total per check type) and `groups` (per JSONL file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BENCH = Path(os.environ.get("KIMIVL_SHARED", ROOT.parent / "shared")) / "ocr-bench"
CACHE = Path(os.environ.get("KIMIVL_CACHE", Path.home() / ".cache" / "kimivl")) / "ocr-bench"
OLMOCR = "olmocr==0.4.27"
SCORER_PACKAGES = ["pypdf", "rapidfuzz", "fuzzysearch", "beautifulsoup4", "tqdm", "playwright", "numpy", "pillow"]
SYSTEMS = [
    "olmocr_anchor",
    "kimivl_text",
    "pymupdf_text",
    "pymupdf4llm_layout",
    "pymupdf4llm_heuristic",
    "pdftotext",
]
CHECK_FILES = ("dataset.jsonl", "blanks.jsonl")


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the scorer's environment


def scorer_python(env: Path, install: bool) -> Path:
    """The scorer environment's interpreter, created and filled on first use."""
    python = env / "bin" / "python"
    if python.exists() and _run_quiet([str(python), "-c", "import olmocr.bench.benchmark, playwright"]):
        return python
    steps = [
        [sys.executable, "-m", "venv", str(env)],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", OLMOCR],
        [str(python), "-m", "pip", "install", "-q", *SCORER_PACKAGES],
    ]
    if not install:
        how = "\n  ".join(" ".join(step) for step in steps)
        sys.exit(f"error: the olmOCR-Bench scorer is not installed; run:\n  {how}\n(or drop --no-install)")
    note(f"installing the olmOCR-Bench scorer ({OLMOCR}, --no-deps) into {env}")
    for step in steps:
        subprocess.run(step, check=True, stdout=subprocess.DEVNULL)
    return python


def _run_quiet(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


# ---------------------------------------------------------------- systems: Markdown per page


def page_file(folder: Path, system: str, pdf: str, page: int) -> Path:
    return folder / system / f"{pdf.removesuffix('.pdf')}_pg{page}_repeat1.md"


def pdf_pages(bench: Path) -> dict[str, int]:
    """Every PDF of the sample (relative name) -> its page count."""
    import pymupdf

    pages = {}
    for path in sorted((bench / "pdfs").rglob("*.pdf")):
        with pymupdf.open(path) as doc:
            pages[path.relative_to(bench / "pdfs").as_posix()] = doc.page_count
    return pages


def write_pages(work: Path, system: str, pages: dict[tuple[str, int], str], counts: dict[str, int]) -> None:
    """One file per page; a page the system produced nothing for gets an empty file (scored as such)."""
    for pdf, count in counts.items():
        for page in range(1, count + 1):
            path = page_file(work / "bench", system, pdf, page)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(pages.get((pdf, page), ""), encoding="utf-8")


def run_anchor(bench: Path, counts: dict[str, int]) -> dict[tuple[str, int], str]:
    out = {}
    for pdf, count in counts.items():
        for page in range(1, count + 1):
            path = page_file(bench, "anchor_olmocr_outputs", pdf, page)
            out[pdf, page] = path.read_text(encoding="utf-8") if path.exists() else ""
    return out


def run_kimivl(bench: Path, work: Path, method: str = "text") -> tuple[dict[tuple[str, int], str], list[dict]]:
    """`kimivl ocr --method METHOD --jsonl` on the sample folder, as a user runs it."""
    out = work / f"kimivl_{method}.jsonl"
    folder = bench / "pdfs"
    command = [sys.executable, "-m", "kimivl_cli", "ocr", str(folder), "--method", method, "--jsonl"]
    result = subprocess.run([*command, "-o", str(out), "--force"], capture_output=True, text=True, cwd=ROOT)
    for line in result.stderr.strip().splitlines():
        note(f"kimivl: {line}")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
    pages = {(Path(r["file"]).relative_to(folder).as_posix(), r["page"]): r["markdown"] for r in records}
    return pages, records


def run_pymupdf_text(bench: Path, counts: dict[str, int]) -> dict[tuple[str, int], str]:
    import pymupdf

    out = {}
    for pdf in counts:
        with pymupdf.open(bench / "pdfs" / pdf) as doc:
            for page in doc:
                out[pdf, page.number + 1] = page.get_text()
    return out


def run_pymupdf4llm(bench: Path, counts: dict[str, int], layout: bool) -> dict[tuple[str, int], str] | None:
    """`to_markdown` per page in a child process: the layout switch is global to the module."""
    code = (
        "import json, sys, pymupdf, pymupdf4llm\n"
        "pymupdf4llm.use_layout(sys.argv[1] == 'layout')\n"
        "out = {}\n"
        "for pdf in sys.argv[3:]:\n"
        "    with pymupdf.open(sys.argv[2] + '/' + pdf) as doc:\n"
        "        for n in range(doc.page_count):\n"
        "            out[pdf + '\\t' + str(n + 1)] = pymupdf4llm.to_markdown(doc, pages=[n], header=False,"
        " footer=False, use_ocr=False, show_progress=False)\n"
        "print(json.dumps(out))\n"
    )
    mode = "layout" if layout else "heuristic"
    result = subprocess.run(
        [sys.executable, "-c", code, mode, str(bench / "pdfs"), *counts], capture_output=True, text=True
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        note(f"pymupdf4llm ({mode}) skipped: {last}")
        return None
    raw = json.loads(result.stdout.strip().splitlines()[-1])
    return {(key.split("\t")[0], int(key.split("\t")[1])): text for key, text in raw.items()}


def run_pdftotext(bench: Path, counts: dict[str, int]) -> dict[tuple[str, int], str] | None:
    if not shutil.which("pdftotext"):
        note("pdftotext skipped: not installed (Debian: apt-get install poppler-utils)")
        return None
    out = {}
    for pdf, count in counts.items():
        for page in range(1, count + 1):
            command = ["pdftotext", "-f", str(page), "-l", str(page), "-enc", "UTF-8", str(bench / "pdfs" / pdf), "-"]
            out[pdf, page] = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    return out


# ---------------------------------------------------------------- scoring (in the scorer env)

_SCORE_DRIVER = r"""
import contextlib, io, json, os, sys
from olmocr.bench import benchmark

work, results_dir = sys.argv[1], sys.argv[2]
kept = {}
original = benchmark.evaluate_candidate

def evaluate(candidate_folder, all_tests, pdf_basenames, force=False):
    result = original(candidate_folder, all_tests, pdf_basenames, force)
    kept[os.path.basename(candidate_folder)] = result
    return result

benchmark.evaluate_candidate = evaluate
sys.argv = ["olmocr.bench.benchmark", "--dir", work]
log = io.StringIO()
with contextlib.redirect_stdout(log):
    benchmark.main()
os.makedirs(results_dir, exist_ok=True)
for name, result in kept.items():
    errors, by_pdf = result[2], result[6]
    with open(os.path.join(results_dir, name + ".jsonl"), "w") as f:
        for pdf, pages in sorted(by_pdf.items()):
            for page, rows in sorted(pages.items()):
                for test, passed, why in rows:
                    row = {"id": test.id, "pdf": pdf, "page": page, "type": test.type, "passed": bool(passed)}
                    f.write(json.dumps({**row, "why": why}) + "\n")
    if errors:
        print(json.dumps({"system": name, "errors": errors[:5]}), file=sys.stderr)
print(log.getvalue())
"""


def score(python: Path, work: Path, browser: str | None) -> str:
    """Run olmOCR-Bench's `main` over WORK; returns its printed report (per-check rows go to WORK/results)."""
    env = {**os.environ, "HOME": str(CACHE / "home")}  # its equation cache lives under ~/.cache/olmocr
    if browser:
        env["PLAYWRIGHT_BROWSERS_PATH"] = str(_browsers_dir(python, browser))
    result = subprocess.run(
        [str(python), "-c", _SCORE_DRIVER, str(work / "bench"), str(work / "results")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    (work / "scorer.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"error: olmOCR-Bench's scorer failed (exit {result.returncode}); see {work / 'scorer.log'}")
    return result.stdout


def _browsers_dir(python: Path, browser: str) -> Path:
    """A Playwright browsers folder whose headless shell is the system's Chromium.

    Playwright says where it expects its own download ("Executable doesn't exist at PATH"); a
    link there to Debian's chromium makes `chromium.launch()` start it, with no download.
    """
    folder = CACHE / "browsers"
    probe = (
        "from playwright.sync_api import sync_playwright\n"
        "with sync_playwright() as p:\n"
        "    p.chromium.launch().close()\n"
    )
    env = {**os.environ, "PLAYWRIGHT_BROWSERS_PATH": str(folder)}
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, check=False)
    missing = re.search(r"Executable doesn't exist at (\S+)", result.stderr)
    if missing:
        target = Path(missing[1])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.symlink_to(browser)
    return folder


def summarise(report: str, work: Path, systems: list[str]) -> dict[str, dict]:
    """Per system: the official overall from the scorer's per-JSONL counts, and per-type counts."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    current = None
    for line in report.splitlines():
        if match := re.match(r"^(\S+)\s+: Average Score:", line):
            current = match[1]
            groups[current] = {}
        elif current and (match := re.match(r"^\s+(\S+)\s*: [\d.]+% \((\d+)/(\d+) tests\)", line)):
            groups[current][match[1]] = (int(match[2]), int(match[3]))
    summary = {}
    for system in systems:
        rows = [json.loads(line) for line in (work / "results" / f"{system}.jsonl").read_text().splitlines()]
        ours = [r for r in rows if not _auto_baseline(r)]
        by_type: dict[str, list[int]] = {}
        for r in ours:
            by_type.setdefault(r["type"], [0, 0])
            by_type[r["type"]][0] += r["passed"]
            by_type[r["type"]][1] += 1
        group = groups.get(system, {})
        summary[system] = {
            "official": round(sum(p / t for p, t in group.values()) / len(group), 4) if group else None,
            "checks": f"{sum(r['passed'] for r in ours)}/{len(ours)}",
            "by_type": {t: f"{p}/{n}" for t, (p, n) in sorted(by_type.items())},
            "groups": {name: f"{p}/{t}" for name, (p, t) in sorted(group.items())},
        }
    return summary


def _auto_baseline(row: dict) -> bool:
    """The baseline check olmOCR-Bench adds for each PDF (not one of the sample's 100)."""
    return row["type"] == "baseline" and row["id"].endswith(".pdf_baseline")


# ---------------------------------------------------------------- main


def prepare_work(bench: Path, work: Path, with_math: bool) -> None:
    """WORK/bench is the folder the scorer reads: the PDFs, the checks, one folder per system."""
    if work.exists():
        shutil.rmtree(work)
    (work / "bench").mkdir(parents=True)
    (work / "bench" / "pdfs").symlink_to((bench / "pdfs").resolve(), target_is_directory=True)
    for name in CHECK_FILES:
        lines = (bench / name).read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and (with_math or json.loads(line)["type"] != "math")]
        (work / "bench" / name).write_text("\n".join(kept) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--bench", type=Path, default=DEFAULT_BENCH, help="the ocr-bench sample folder")
    parser.add_argument("--work", type=Path, default=CACHE / "work", help="outputs and per-check results go here")
    parser.add_argument("--env", type=Path, default=CACHE / "env", help="the scorer's virtual environment")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, help="score only these")
    parser.add_argument("--no-install", action="store_true", help="print how to install the scorer instead")
    args = parser.parse_args()
    if not (args.bench / "dataset.jsonl").exists():
        sys.exit(f"error: no olmOCR-Bench sample at {args.bench} (set KIMIVL_SHARED or pass --bench)")
    python = scorer_python(args.env, install=not args.no_install)
    browser = chromium()
    if browser is None:
        note("math checks left out: no Chromium for KaTeX (Debian: apt-get install chromium)")
    work = args.work.resolve()
    prepare_work(args.bench, work, with_math=browser is not None)
    counts = pdf_pages(args.bench)
    produced: list[str] = []
    routes: list[dict] = []
    for system in args.systems:
        if system == "olmocr_anchor":
            pages = run_anchor(args.bench, counts)
        elif system == "kimivl_text":
            pages, routes = run_kimivl(args.bench, work)
        elif system == "pymupdf_text":
            pages = run_pymupdf_text(args.bench, counts)
        elif system.startswith("pymupdf4llm"):
            pages = run_pymupdf4llm(args.bench, counts, layout=system.endswith("layout"))
        else:
            pages = run_pdftotext(args.bench, counts)
        if pages is not None:
            write_pages(work, system, pages, counts)
            produced.append(system)
    report = score(python, work, browser)
    results = summarise(report, work, produced)
    output = {
        "scorer": f"{OLMOCR} olmocr/bench/benchmark.py (unmodified)",
        "math_checks": "rendered with KaTeX in " + browser if browser else "left out (no Chromium)",
        "work": str(work),
        "systems": results,
        "kimivl_routes": [{k: r.get(k) for k in ("file", "page", "method", "route", "reason")} for r in routes],
    }
    if args.json:
        print(json.dumps(output, indent=2))
        return
    print(f"{'system':24s} {'official':>8s} {'checks':>7s}  by type")
    for system, r in results.items():
        types = "  ".join(f"{t} {v}" for t, v in r["by_type"].items())
        print(f"{system:24s} {r['official'] or 0:8.3f} {r['checks']:>7s}  {types}")
    print(f"scorer: {output['scorer']}; math checks {output['math_checks']}; per-check results in {work}/results")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
