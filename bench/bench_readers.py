"""Reader memory on a large generated input: peak RSS of a fresh process reading every pair of a
~1 GB TMX, TSV and 6-way multiway folder (generated in a temporary folder, never stored).

Each reader runs in its own process; the figure is the growth of peak RSS (``ru_maxrss``) from just
before reading to the end, so the interpreter and imports are left out. Ratios are against the same
reader on a 10x smaller input measured in the same run: flat memory means ~1x.

    .venv/bin/python bench/bench_readers.py [--mb 1024] [--formats tmx,tsv,multiway]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LANGS = ("ar", "es", "fr", "ru", "zh")


def _line(i: int) -> tuple[str, str]:
    return (f"the committee adopted resolution {i} on the agenda item number {i % 997}", f"der Ausschuss {i}")


def generate(fmt: str, folder: Path, mb: int) -> tuple[Path, int]:
    """An input of about ``mb`` MiB; returns its path and the number of pairs in it."""
    target, n = mb << 20, 0
    if fmt == "multiway":
        folder.mkdir(parents=True)
        files = {lang: (folder / f"un.{lang}").open("w", encoding="utf-8") for lang in ("en", *LANGS)}
        size = 0
        while size < target:
            en, _ = _line(n)
            files["en"].write(en + "\n")
            size += len(en) + 1
            for lang in LANGS:
                t = f"{lang} {n} traduction de la ligne {n % 991}\n"
                files[lang].write(t)
                size += len(t)
            n += 1
        for f in files.values():
            f.close()
        return folder, n * len(LANGS)
    path = folder.with_suffix("." + fmt)
    with path.open("w", encoding="utf-8") as f:
        if fmt == "tmx":
            f.write('<?xml version="1.0" encoding="UTF-8"?>\n<tmx version="1.4"><header/><body>\n')
        while f.tell() < target:
            buf = []
            for _ in range(10_000):
                s, t = _line(n)
                n += 1
                if fmt == "tmx":
                    buf.append(
                        f'<tu><tuv xml:lang="en"><seg>{s} <b>x</b></seg></tuv>'
                        f'<tuv xml:lang="de"><seg>{t}</seg></tuv></tu>\n'
                    )
                else:
                    buf.append(f"{s}\t{t}\n")
            f.write("".join(buf))
        if fmt == "tmx":
            f.write("</body></tmx>\n")
    return path, n


def read_peak(fmt: str, path: Path) -> dict:
    code = (
        "import json, resource, time; from pathlib import Path\n"
        "import xml.parsers.expat\n"
        "from mlctl.data.readers import Counts, read_input\n"
        "c = Counts(); r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t0 = time.perf_counter()\n"
        f"n = sum(1 for _ in read_input(Path({str(path)!r}), {fmt!r}, 'en', {'' if fmt == 'multiway' else 'de'!r}, c))\n"
        "print(json.dumps({'pairs': n, 'seconds': time.perf_counter() - t0, 'skips': dict(c.by_reason),"
        " 'grew_mb': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r0) / 1024,"
        " 'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of each input in MiB")
    ap.add_argument("--formats", default="tmx,tsv,multiway")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_readers_"))
    try:
        for fmt in args.formats.split(","):
            res = {}
            for mb in (max(1, args.mb // 10), args.mb):
                t0 = time.perf_counter()
                path, n = generate(fmt, tmp / f"{fmt}{mb}", mb)
                made = time.perf_counter() - t0
                r = read_peak(fmt, path)
                assert r["pairs"] == n, (r, n)
                res[mb] = r
                print(
                    f"{fmt:>8} {mb:>5} MiB ({n:,} pairs, generated in {made:.0f} s): read in "
                    f"{r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MiB, grew {r['grew_mb']:.1f} MiB",
                    flush=True,
                )
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            small, big = res.values()
            print(
                f"{fmt:>8}: RSS growth {big['grew_mb']:.1f} vs {small['grew_mb']:.1f} MiB on a 10x smaller "
                f"input; peak RSS ratio {big['peak_mb'] / small['peak_mb']:.2f}x"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
