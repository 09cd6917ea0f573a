"""Reports of barrier checks: the terminal table, the stable JSON document, Markdown and HTML.

JSON schema (``schema`` = ``hcdiag.check-barrier/1``)::

    {"schema": "hcdiag.check-barrier/1", "run": path, "tolerance": tau, "require": [ids],
     "status": "holds" | "fails" | "inconclusive",      # over the required checks
     "checks": [{"id", "claim", "section", "verdict", "summary", "values", "witness", "reason",
                 "tolerance"}, ...]}

Adding keys is a compatible change; renaming or removing one bumps the schema version.
"""

from __future__ import annotations

import json
import textwrap

from hcdiag.checks.base import CheckResult

SCHEMA = "hcdiag.check-barrier/1"


def overall(results: list[CheckResult], require: list[str] | None = None) -> str:
    """``fails`` if any required check fails, else ``holds`` if all hold, else ``inconclusive``."""
    req = [r for r in results if require is None or r.id in require]
    if any(r.verdict == "fails" for r in req):
        return "fails"
    if all(r.verdict == "holds" for r in req):
        return "holds"
    return "inconclusive"


def exit_status(results: list[CheckResult], require: list[str] | None = None) -> int:
    """0 when every required check holds, 1 otherwise (fails or inconclusive)."""
    return 0 if overall(results, require) == "holds" else 1


def to_json_doc(results: list[CheckResult], *, run_path=None, tolerance: float = 0.05, require=None) -> dict:
    from hcdiag.formats import to_jsonable

    return to_jsonable({"schema": SCHEMA, "run": str(run_path) if run_path else None, "tolerance": tolerance,
                        "require": list(require) if require else [r.id for r in results],
                        "status": overall(results, require), "checks": [r.to_dict() for r in results]})


def text_table(results: list[CheckResult], *, width: int = 110) -> str:
    """Check, claim, verdict and the deciding numbers, wrapped for a terminal."""
    mark = {"holds": "holds", "fails": "FAILS", "inconclusive": "inconclusive"}
    lines = [f"{'check':<5} {'verdict':<12} {'claim / deciding numbers'}", f"{'-' * 5} {'-' * 12} {'-' * (width - 19)}"]
    for r in results:
        body = textwrap.wrap(r.claim, width - 19) + textwrap.wrap("-> " + (r.summary or r.reason or ""), width - 19)
        lines.append(f"{r.id:<5} {mark[r.verdict]:<12} {body[0]}")
        lines += [f"{'':<5} {'':<12} {b}" for b in body[1:]]
    return "\n".join(lines)


EPOCH_READINGS = {"steps": "Algorithm 1's: each active clustering gets steps_per_clustering steps per epoch",
                  "epochs": "a full pass over the data per active clustering per epoch",
                  "data_pass": "one pass over the data per epoch, its steps cycling through the active clusterings"}


def run_description(run) -> str:
    """One line on how the run was trained (a :class:`hcdiag.runfile.Run`): method, s2, loss convention and,
    for HCT, the reading of its epoch (``config.hct.epoch_unit``), which the file records."""
    cfg = run.config
    parts = [f"method `{cfg.method}`", f"s2 = {cfg.s2:.4g}" + (f" ({cfg.multiple:g} x lambda_max)" if cfg.multiple else "")]
    parts.append(f"loss convention `{cfg.loss}`" if cfg.loss else "loss convention not recorded")
    unit = (cfg.hct or {}).get("epoch_unit")
    if cfg.is_hct:
        parts.append(f"HCT's epoch `{unit}`: {EPOCH_READINGS.get(unit, 'as the producer defines it')}" if unit
                     else "HCT's epoch not recorded")
    return "Trained with " + ", ".join(parts) + "."


def markdown(results: list[CheckResult], *, run_path=None, tolerance: float = 0.05, figures: list[tuple[str, str]] = (),
             require: list[str] | None = None, about: str | None = None,
             title: str = "hcdiag check-barrier report") -> str:
    """A Markdown report: the verdict table, each check's numbers and witness, the figures. ``Overall`` is
    decided by the ``require``d checks (default all), as the JSON document and the exit status are."""
    deciding = f" (deciding checks: {', '.join(require)})" if require else ""
    out = [f"# {title}", "", f"Run: `{run_path}`  ", *([f"{about}  "] if about else []),
           *([f"Tolerance tau = {tolerance:g}  "] if tolerance is not None else []),
           f"Overall: **{overall(results, require)}**{deciding}", "", "| check | section | verdict | deciding numbers |", "|---|---|---|---|"]
    for r in results:
        out.append(f"| {r.id} | {r.section} | {r.verdict} | {(r.summary or r.reason or '').replace('|', '/')} |")
    for cap, fname in figures:
        out += ["", f"![{cap}]({fname})", "", f"*{cap}*"]
    out += ["", "## Details"]
    for r in results:
        out += ["", f"### {r.id}: {r.verdict}", "", f"> {r.claim} ({r.section})", ""]
        if r.reason:
            out.append(f"Inconclusive because: {r.reason}")
        scal = {k: v for k, v in r.values.items() if isinstance(v, (int, float, str, bool)) or v is None}
        for k, v in scal.items():
            out.append(f"- `{k}` = {v:.6g}" if isinstance(v, float) else f"- `{k}` = {v}")
        if r.witness:
            out.append(f"- witness: `{json.dumps(_short(r.witness))}`")
    return "\n".join(out) + "\n"


def _short(d: dict) -> dict:
    from hcdiag.formats import to_jsonable

    out = {}
    for k, v in to_jsonable(d).items():
        if isinstance(v, list) and len(v) > 8:
            v = f"[{len(v)} values]"
        out[k] = v
    return out


def html(md_text: str, images: dict[str, bytes]) -> str:
    """A self-contained HTML page from the Markdown report (figures embedded as base64 PNG)."""
    import base64
    import html as h
    import re

    body = []
    in_table = False
    for line in md_text.splitlines():
        img = re.match(r"!\[(.*)\]\((.*)\)", line)
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{_inline(h.escape(c))}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if img and img.group(2) in images:
            data = base64.b64encode(images[img.group(2)]).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{h.escape(img.group(1))}"></figure>')
        elif line.startswith("#"):
            n = len(line) - len(line.lstrip("#"))
            body.append(f"<h{n}>{h.escape(line[n:].strip())}</h{n}>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{h.escape(line[2:])}</blockquote>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(h.escape(line[2:]))}</li>")
        elif line.startswith("*") and line.endswith("*"):
            body.append(f"<p class='cap'>{h.escape(line.strip('*'))}</p>")
        elif line.strip():
            body.append(f"<p>{_inline(h.escape(line))}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
             "img{max-width:100%}.cap{color:#555;font-style:italic}code{background:#f4f4f4}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>hcdiag report</title><style>{style}</style></head><body>" \
           + "\n".join(body) + "</body></html>\n"


def _inline(s: str) -> str:
    import re

    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def figure_pngs(figs) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` of ``[(caption, file name, figure), ...]``; closes each figure."""
    import io

    import matplotlib.pyplot as plt

    images = {}
    for _cap, name, fig in figs:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        images[name] = buf.getvalue()
    return images


def write_files(out_dir, files: dict[str, bytes]) -> list[str]:
    """Write ``{file name: bytes}`` into ``out_dir`` whole or not at all; returns the sorted names.

    Every file goes to a temporary ``.NAME.XXXXXXXX.tmp`` first (flushed and fsynced), and only when all
    are written are they renamed over their names. A failed write (a full disk) removes the temporaries
    and raises :class:`~hcdiag.errors.InputError` (one line): the previous report files stay as they
    were. Temporaries a killed writer left for a report file are removed first (:mod:`hcdiag.atomic`).
    """
    import os
    from pathlib import Path

    from hcdiag.atomic import file_mode, remove_stale, temporary
    from hcdiag.errors import InputError

    out = Path(out_dir)
    remove_stale(out, lambda name: name in files or name.endswith(_REPORT_SUFFIXES))
    for name in files:  # the fixed-name temporaries earlier versions wrote (.report.md.tmp)
        legacy = out / f".{name}.tmp"
        if legacy.is_file() and not legacy.is_symlink():
            legacy.unlink(missing_ok=True)
    temps: list[tuple[int, Path, str]] = []
    try:
        for name, data in files.items():
            fd, tmp = temporary(out, name)
            temps.append((fd, tmp, name))
            with os.fdopen(fd, "wb", closefd=False) as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, file_mode(out / name))
        for _fd, tmp, name in temps:
            os.replace(tmp, out / name)
    except BaseException as exc:
        for _fd, tmp, _name in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"{out}: could not write the report ({exc.strerror or type(exc).__name__}); the previous "
                             "report files (if any) are untouched: free space or choose another folder.") from None
        raise
    finally:
        for fd, _tmp, _name in temps:
            os.close(fd)  # releases each temporary's lock only after its rename or removal
    return sorted(files)


# what write_files writes: figures, report.md, report.html, results.json
_REPORT_SUFFIXES = (".png", ".md", ".html", ".json")
