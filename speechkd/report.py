"""Experiment report: aggregate per-model eval results over seeds into ``EXP/report.md`` + plots.

Inputs (all under one experiment directory ``EXP``):

* ``EXP/eval/*.json`` - one dict per evaluated model with the keys

  ============== ======================================================================
  name           str, unique, e.g. ``"student-mvq-seed1"``
  group          str, rows of one group are aggregated over seeds, e.g. ``"student-mvq"``
  role           ``"teacher"`` | ``"baseline"`` | ``"distilled"``
  method         str, ``"none"`` | ``"mvq"`` | ``"l1"`` | ``"l2"`` | ...
  seed           int
  params         int, number of parameters
  dev_wer        float, percent
  test_wer       float, percent
  rtf            float (real-time factor, < 1 is faster than real time) or null
  label_kind     ``"none"`` | ``"ci"`` (codebook indexes) | ``"float32"`` (embeddings)
  label_bytes    int or null, bytes of stored teacher labels the model trained on
  train_seconds  float or null, wall-clock training time in seconds
  train_cpu_seconds  optional float or null: CPU seconds of the training process (all its threads)
  notes          optional str
  float32_label_bytes  optional int: the same teacher frames stored as float32 (for the storage ratio
                 when the experiment has no L1/L2 student)
  ============== ======================================================================

* training curves, optional: ``EXP/teacher/metrics.csv`` for the teacher and
  ``EXP/students/<name>/metrics.csv`` for the others (Lightning ``CSVLogger`` files with
  ``epoch``, ``step``, ``train_loss``, ``val_wer`` columns; a ``version_*/metrics.csv`` below
  those folders is found too). Missing files or columns are noted in the report, not fatal.

Outputs: ``EXP/report.md``, ``EXP/plots/training_curves.png`` and
``EXP/plots/wer_vs_label_bytes.png``, all written atomically.

Command line: ``python -m speechkd.report EXP [--title TITLE]``.

SSL-distillation experiments (``task: ssl`` recipes) have other results (KWS accuracy, SV EER / minDCF per
trial list): :func:`write_ssl_report` writes their ``report.md`` (and ``plots/ssl_tasks.png``) from
``eval/<encoder>-<mode>.json`` (keys: :data:`SSL_REQUIRED_KEYS`), reusing this module's table and plot helpers.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from speechkd.utils import atomic_path, write_text_atomic

__all__ = ["load_results", "aggregate", "write_report", "ROLES", "REQUIRED_KEYS", "load_ssl_results", "write_ssl_report"]

ROLES = ("teacher", "baseline", "distilled")
_ROLE_RANK = {r: i for i, r in enumerate(ROLES)}

# key -> (accepted types, may be null)
_NUM = (int, float)
REQUIRED_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), False),
    "group": ((str,), False),
    "role": ((str,), False),
    "method": ((str,), False),
    "seed": ((int,), False),
    "params": ((int,), False),
    "dev_wer": (_NUM, False),
    "test_wer": (_NUM, False),
    "rtf": (_NUM, True),
    "label_kind": ((str,), False),
    "label_bytes": ((int,), True),
    "train_seconds": (_NUM, True),
}

DEPLOYED_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "bytes": ((int,), False),
    "test_wer": (_NUM, False),
    "rtf": (_NUM, False),
}
"""Keys of each precision (``fp32``, ``int8``) of a result's optional ``deployed`` block (``eval.deployed``, written by
:func:`speechkd.export.measure_deployed`): ONNX graph bytes, onnxruntime greedy test WER in percent, RTF."""

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- loading
def _read_eval_files(exp_dir: PathLike) -> list[tuple[Path, Any]]:
    """``(file, parsed JSON)`` for every ``EXP/eval/*.json``, sorted by file name.

    Raises:
        FileNotFoundError: no ``EXP/eval``. ValueError: no file, or malformed JSON (names the file).
    """
    eval_dir = Path(exp_dir) / "eval"
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"no eval directory: {eval_dir}")
    files = sorted(eval_dir.glob("*.json"))
    if not files:
        raise ValueError(f"no result files (*.json) in {eval_dir}")
    out = []
    for f in files:
        try:
            out.append((f, json.loads(f.read_text(encoding="utf-8"))))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: malformed JSON: {e}") from e
    return out


def _check_keys(res: Any, src: str, required: dict[str, tuple[tuple[type, ...], bool]]) -> dict:
    """Check that ``res`` is a JSON object with every key of ``required`` of its types (finite numbers; null
    only where allowed); raise ValueError naming ``src`` otherwise."""
    if not isinstance(res, dict):
        raise ValueError(f"{src}: expected a JSON object, got {type(res).__name__}")
    missing = [k for k in required if k not in res]
    if missing:
        raise ValueError(f"{src}: missing keys {missing}")
    for key, (types, nullable) in required.items():
        v = res[key]
        if v is None and nullable:
            continue
        if isinstance(v, bool) or not isinstance(v, types):
            want = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
            raise ValueError(f"{src}: key {key!r} must be {want}, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{src}: key {key!r} must be finite, got {v!r}")
    return res


def _validate(res: Any, src: str) -> dict:
    _check_keys(res, src, REQUIRED_KEYS)
    if res["role"] not in ROLES:
        raise ValueError(f"{src}: role must be one of {ROLES}, got {res['role']!r}")
    for key in ("name", "group", "method", "label_kind"):
        if not res[key].strip():
            raise ValueError(f"{src}: key {key!r} must not be empty")
    for key in ("params", "label_bytes", "dev_wer", "test_wer", "rtf", "train_seconds"):
        if res[key] is not None and res[key] < 0:
            raise ValueError(f"{src}: key {key!r} must be >= 0, got {res[key]!r}")
    if "notes" in res and res["notes"] is not None and not isinstance(res["notes"], str):
        raise ValueError(f"{src}: key 'notes' must be a string, got {res['notes']!r}")
    if res.get("deployed") is not None:
        for q in ("fp32", "int8"):
            d = _check_keys(res["deployed"].get(q) if isinstance(res["deployed"], dict) else None,
                            f"{src}: deployed.{q}", DEPLOYED_KEYS)
            for key in DEPLOYED_KEYS:
                if d[key] < 0:
                    raise ValueError(f"{src}: deployed.{q}.{key} must be >= 0, got {d[key]!r}")
    return res


def load_results(exp_dir: PathLike) -> list[dict]:
    """Read and validate every ``EXP/eval/*.json`` (sorted by file name).

    Args:
        exp_dir: the experiment directory.

    Returns:
        One dict per file, as stored (see the module docstring for the keys).

    Raises:
        FileNotFoundError: when ``EXP/eval`` does not exist.
        ValueError: a file is not valid JSON, lacks a key or has a wrong type/value (the message
            names the file); no JSON file at all; two results share a ``name``.
    """
    results, seen = [], {}
    for f, data in _read_eval_files(exp_dir):
        res = _validate(data, str(f))
        if res["name"] in seen:
            raise ValueError(f"{f}: name {res['name']!r} already used by {seen[res['name']]}")
        seen[res["name"]] = f
        results.append(res)
    return results


# --------------------------------------------------------------------------- aggregation
def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _rel_reduction(base: Optional[float], x: float) -> Optional[float]:
    if base is None or base == 0:
        return None
    return (base - x) / base * 100.0


def aggregate(results: Iterable[dict]) -> list[dict]:
    """Aggregate per-model results into one row per ``group``.

    Rows are ordered teacher, baseline, distilled, then by first appearance. Each row has:

    * ``group``, ``role``, ``method``, ``label_kind``; ``n`` (number of seeds), ``seeds``,
      ``names`` (lists, in input order)
    * ``params`` (int) and ``params_ratio`` = params / teacher params (None without a teacher)
    * ``dev_wer_mean``, ``dev_wer_std``, ``test_wer_mean``, ``test_wer_std`` in percent; std is
      the sample std (ddof=1), 0.0 for a single seed
    * ``rtf_mean``, ``train_seconds_mean`` (None when no seed reports it)
    * ``label_bytes``: mean over the seeds that report it, as int, else None
    * ``rel_dev_wer_reduction``, ``rel_test_wer_reduction``: ``(base - x) / base * 100`` with
      the baseline group's and this group's mean WERs, in percent (positive = better than the
      baseline; 0 for the baseline itself; None without a baseline or when base == 0). With
      several baseline groups (students of several sizes), a row's baseline is the one with the
      same number of parameters (``baseline`` names it; None when no size matches).
    * ``param_reduction`` = teacher params / params; ``rel_test_wer_increase`` =
      ``(x - teacher) / teacher * 100`` (None without a teacher or when its WER is 0)
    * ``storage_ratio``: for ``label_kind == "ci"`` rows, float32 label bytes / this row's
      label bytes (the smallest float32 group's bytes when several); else None

    Args:
        results: per-model dicts as returned by :func:`load_results`.

    Returns:
        The list of row dicts.

    Raises:
        ValueError: no results; inside one group, differing role/method/label_kind/params or
            a repeated seed; more than one teacher group, or two baseline groups of one size.
    """
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    if not groups:
        raise ValueError("no results to aggregate")

    rows = []
    for g, members in groups.items():
        for key in ("role", "method", "label_kind", "params"):
            vals = {m[key] for m in members}
            if len(vals) > 1:
                raise ValueError(
                    f"group {g!r}: results disagree on {key!r}: {sorted(map(str, vals))}"
                )
        seeds = [m["seed"] for m in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"group {g!r}: repeated seed in {seeds}")
        dev_m, dev_s = _mean_std([m["dev_wer"] for m in members])
        test_m, test_s = _mean_std([m["test_wer"] for m in members])
        rtfs = [m["rtf"] for m in members if m["rtf"] is not None]
        secs = [m["train_seconds"] for m in members if m["train_seconds"] is not None]
        lbytes = [m["label_bytes"] for m in members if m["label_bytes"] is not None]
        f32bytes = [m["float32_label_bytes"] for m in members if m.get("float32_label_bytes")]
        rows.append(
            {
                "group": g,
                "role": members[0]["role"],
                "method": members[0]["method"],
                "label_kind": members[0]["label_kind"],
                "n": len(members),
                "seeds": seeds,
                "names": [m["name"] for m in members],
                "params": members[0]["params"],
                "params_ratio": None,
                "dev_wer_mean": dev_m,
                "dev_wer_std": dev_s,
                "test_wer_mean": test_m,
                "test_wer_std": test_s,
                "rtf_mean": float(np.mean(rtfs)) if rtfs else None,
                "train_seconds_mean": float(np.mean(secs)) if secs else None,
                "label_bytes": int(round(float(np.mean(lbytes)))) if lbytes else None,
                "rel_dev_wer_reduction": None,
                "rel_test_wer_reduction": None,
                "storage_ratio": None,
                "float32_label_bytes": int(f32bytes[0]) if f32bytes else None,
                "baseline": None,
                "param_reduction": None,
                "rel_test_wer_increase": None,
            }
        )
    rows.sort(key=lambda r: _ROLE_RANK[r["role"]])  # stable: keeps first-appearance order

    teacher = _single_role(rows, "teacher")
    f32 = [r["label_bytes"] for r in rows if r["label_kind"] == "float32" and r["label_bytes"]]
    # a CI row may carry the bytes the same frames take as float32 (written beside the CI by `extract`)
    f32 += [r["float32_label_bytes"] for r in rows if r.get("float32_label_bytes")]
    for r in rows:
        if teacher is not None and teacher["params"] > 0:
            r["params_ratio"] = r["params"] / teacher["params"]
            r["param_reduction"] = teacher["params"] / r["params"] if r["params"] else None
            if teacher["test_wer_mean"] > 0:
                r["rel_test_wer_increase"] = (r["test_wer_mean"] - teacher["test_wer_mean"]) / teacher["test_wer_mean"] * 100
        base = _baseline_for(r, rows)
        if base is not None:
            r["baseline"] = base["group"]
            r["rel_dev_wer_reduction"] = _rel_reduction(base["dev_wer_mean"], r["dev_wer_mean"])
            r["rel_test_wer_reduction"] = _rel_reduction(base["test_wer_mean"], r["test_wer_mean"])
        if r["label_kind"] == "ci" and r["label_bytes"] and f32:
            r["storage_ratio"] = min(f32) / r["label_bytes"]
    return rows


def _baseline_for(row: dict, rows: list[dict]) -> Optional[dict]:
    """The baseline group a row is compared with: the only one, or the one with the row's params.

    Raises:
      ValueError: two baseline groups with the same number of parameters (ambiguous).
    """
    bases = [r for r in rows if r["role"] == "baseline"]
    if row["role"] == "teacher" or not bases:
        return None
    same = [b for b in bases if b["params"] == row["params"]]
    if len(same) > 1:
        raise ValueError(f"expected at most one baseline group per size, got {[b['group'] for b in same]} "
                         f"with {row['params']} parameters")
    if same:
        return same[0]
    return bases[0] if len(bases) == 1 else None


def _test_errors(exp: Path, names: list[str]) -> Optional[tuple[list[str], np.ndarray, np.ndarray]]:
    """``(utterance ids, errors (S, U), ref_words (U,))`` of the runs ``names`` from their ``eval/<name>-test-errs.txt``
    files, on the utterances every file holds; None when a file is missing."""
    from speechkd.eval.metrics import read_wer_details

    files = [exp / "eval" / f"{n}-test-errs.txt" for n in names]
    if not files or not all(f.is_file() for f in files):
        return None
    per = [read_wer_details(f) for f in files]
    ids = [u for u in per[0] if all(u in d for d in per[1:])]
    errors = np.array([[d[u][0] for u in ids] for d in per], dtype=np.int64)
    return ids, errors, np.array([per[0][u][1] for u in ids], dtype=np.int64)


def _sampling_error_section(exp: Path, results: list[dict], rows: list[dict]) -> list[str]:
    """Markdown lines: each group's 95% bootstrap interval of its seeds' mean test WER over the test utterances,
    and a distilled group's paired interval of its difference from its baseline (the same utterance draws for
    both; :func:`speechkd.eval.metrics.bootstrap_wer_interval`). Empty when the error files are missing."""
    from speechkd.eval.metrics import bootstrap_wer_interval

    names = {r["group"]: [x["name"] for x in results if x["group"] == r["group"]] for r in rows}
    data = {g: _test_errors(exp, n) for g, n in names.items()}
    body = []
    for r in rows:
        d = data[r["group"]]
        if d is None:
            continue
        ids, err, ref = d
        lo, hi = bootstrap_wer_interval(err, ref)
        diff = "-"
        base = _baseline_for(r, rows)
        if base is not None and base["group"] != r["group"] and data.get(base["group"]) is not None:
            b_ids, b_err, _ = data[base["group"]]
            if b_ids == ids:
                dlo, dhi = bootstrap_wer_interval(err, ref, baseline_errors=b_err)
                point = 100.0 * (err.sum(1).mean() - b_err.sum(1).mean()) / ref.sum()
                diff = f"{point:+.2f} [{dlo:+.2f}, {dhi:+.2f}] vs {base['group']}"
        body.append([r["group"], str(err.shape[0]), str(len(ids)), f"{100.0 * err.sum(1).mean() / ref.sum():.2f}",
                     f"[{lo:.2f}, {hi:.2f}]", diff])
    if not body:
        return []
    return ["", "### Sampling error of the test set", "",
            _table(["Model", "Seeds", "Test utterances", "Mean test WER %", "95% interval",
                    "Difference from baseline, points [95% interval]"], body), "",
            "Percentile bootstrap over the test utterances (2000 draws, seed 0; Bisani & Ney 2004): each draw scores "
            "every seed of a group on the same utterances and averages them; the difference is paired (the same "
            "draw for the model and its baseline), so it measures the test set's sampling error of the comparison, "
            "not the seeds' spread (the ± above)."]


def _single_role(rows: list[dict], role: str) -> Optional[dict]:
    found = [r for r in rows if r["role"] == role]
    if len(found) > 1:
        raise ValueError(
            f"expected at most one {role} group, got {[r['group'] for r in found]}"
        )
    return found[0] if found else None


# --------------------------------------------------------------------------- formatting
def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _fmt_wer(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f} ({n})" if n > 1 else f"{mean:.2f} ± - (1)"


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------- atomic writes
def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# --------------------------------------------------------------------------- curves
_LOSS_COLUMNS = ("train_loss", "train_loss_epoch", "train_loss_step")


def _curve_file(exp_dir: Path, res: dict) -> Optional[Path]:
    if res["role"] == "teacher":
        t = exp_dir / "teacher"
        cands, roots = [t / "metrics.csv", t / res["name"] / "metrics.csv"], [t]
    else:
        d = exp_dir / "students" / res["name"]
        cands, roots = [d / "metrics.csv"], [d]
    for c in cands:
        if c.is_file():
            return c
    for root in roots:  # Lightning's CSVLogger default: <dir>/lightning_logs/version_N/metrics.csv
        if not root.is_dir():
            continue
        found = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def _plateau(exp: Path, res: dict) -> list[str]:
    """``[epochs, "best (epoch)", "change over the last 5 epochs"]`` of a run's dev-WER curve, as table cells
    ("-" without a curve). The change is ``WER(last) - WER(5 epochs before)`` in points."""
    f = _curve_file(exp, res)
    curves = _read_curves(f)[0] if f is not None else {}
    if "val_wer" not in curves:
        return ["-", "-", "-"]
    eps, wer = curves["val_wer"]
    best = int(np.argmin(wer))
    change = f"{wer[-1] - wer[-6]:+.2f}" if wer.size > 5 else "-"
    return [str(int(eps[-1]) + 1), f"{wer[best]:.2f} ({int(eps[best]) + 1})", change]


def _float(s: Optional[str]) -> Optional[float]:
    if s is None or s.strip() == "":
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _read_curves(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Per-epoch curves from a CSVLogger file: {'train_loss': (epochs, mean loss per epoch),
    'val_wer': (epochs, last val WER per epoch)}; plus notes about what was missing."""
    notes: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return {}, [f"{path}: unreadable ({e})"]
    if "epoch" not in cols:
        return {}, [f"{path}: no 'epoch' column"]
    loss_col = next((c for c in _LOSS_COLUMNS if c in cols), None)
    losses: dict[float, list[float]] = defaultdict(list)
    wers: dict[float, float] = {}
    for row in rows:
        ep = _float(row.get("epoch"))
        if ep is None:
            continue
        if loss_col is not None and (v := _float(row.get(loss_col))) is not None:
            losses[ep].append(v)
        if (v := _float(row.get("val_wer"))) is not None:
            wers[ep] = v
    curves = {}
    if losses:
        eps = sorted(losses)
        curves["train_loss"] = (np.array(eps), np.array([np.mean(losses[e]) for e in eps]))
    else:
        notes.append(f"{path}: no train loss values")
    if wers:
        eps = sorted(wers)
        curves["val_wer"] = (np.array(eps), np.array([wers[e] for e in eps]))
    else:
        notes.append(f"{path}: no val_wer values")
    return curves, notes


# --------------------------------------------------------------------------- plots
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)  # Agg backend, independent of pyplot's global state
    return fig


def _group_colors(rows: list[dict]) -> dict[str, Any]:
    from matplotlib import colormaps

    tab10 = colormaps["tab10"]
    palette = [tab10(i) for i in range(10) if i != 7]  # gray (7) is kept for the baseline
    colors, k = {}, 0
    for r in rows:
        if r["role"] == "teacher":
            colors[r["group"]] = "black"
        elif r["role"] == "baseline":
            colors[r["group"]] = "tab:gray"
        else:
            colors[r["group"]] = palette[k % len(palette)]
            k += 1
    return colors


def _plot_training_curves(
    path: Path, exp_dir: Path, results: list[dict], rows: list[dict]
) -> list[str]:
    from matplotlib.ticker import MaxNLocator

    colors = _group_colors(rows)
    order = {r["group"]: i for i, r in enumerate(rows)}
    fig = _figure(11, 4.2)
    ax_loss, ax_wer = fig.subplots(1, 2)
    notes, labelled, plotted = [], set(), 0
    for res in sorted(results, key=lambda r: (order[r["group"]], r["seed"])):
        f = _curve_file(exp_dir, res)
        if f is None:
            notes.append(f"no metrics.csv for {res['name']}")
            continue
        curves, n = _read_curves(f)
        notes += n
        g = res["group"]
        label = None if g in labelled else g  # one legend entry per group, on each axis
        for key, ax in (("train_loss", ax_loss), ("val_wer", ax_wer)):
            if key in curves:
                x, y = curves[key]
                ax.plot(x, y, marker="o", ms=3, lw=1.4, alpha=0.85, color=colors[g], label=label,
                        zorder=3 if res["role"] == "teacher" else 2)
                plotted += 1
        if curves:
            labelled.add(g)
    ax_loss.set(title="Training loss (mean per epoch)", xlabel="epoch", ylabel="train loss")
    ax_wer.set(title="Validation WER", xlabel="epoch", ylabel="val WER (%)")
    for ax in (ax_loss, ax_wer):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if plotted:
        handles = {}  # one legend for both axes: union of the groups plotted on either
        for ax in (ax_loss, ax_wer):
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        ax_wer.legend(handles.values(), handles.keys(), fontsize=8,
                      title="group (one line per seed)", title_fontsize=8)
    else:
        for ax in (ax_loss, ax_wer):
            ax.text(0.5, 0.5, "no training curves found", ha="center", va="center",
                    transform=ax.transAxes)
    _save_fig(fig, path)
    return notes


def _plot_wer_vs_label_bytes(path: Path, rows: list[dict]) -> None:
    colors = _group_colors(rows)
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    pts = [r for r in rows if r["label_bytes"]]
    markers = {"ci": "o", "float32": "s"}
    for r in pts:
        ax.errorbar(
            r["label_bytes"], r["test_wer_mean"], yerr=r["test_wer_std"] if r["n"] > 1 else None,
            fmt=markers.get(r["label_kind"], "D"), ms=7, capsize=4, color=colors[r["group"]],
            label=f"{r['group']} ({r['label_kind']}, n={r['n']})",
        )
        ax.annotate(r["group"], (r["label_bytes"], r["test_wer_mean"]), xytext=(6, 6),
                    textcoords="offset points", fontsize=8)
    for role, style in (("baseline", "--"), ("teacher", ":")):
        for r in (x for x in rows if x["role"] == role):
            m, s = r["test_wer_mean"], r["test_wer_std"]
            ax.axhline(m, ls=style, lw=1.5, color=colors[r["group"]],
                       label=f"{role}: {r['group']} ({m:.2f}%)")
            if r["n"] > 1 and s > 0:
                ax.axhspan(m - s, m + s, color=colors[r["group"]], alpha=0.12, lw=0)
    ax.set_xscale("log")
    if pts:
        xs = [r["label_bytes"] for r in pts]
        ax.set_xlim(min(xs) / 3, max(xs) * 3)
    else:
        ax.text(0.5, 0.5, "no model trained on stored labels", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(title="Test WER vs teacher-label storage (mean ± std over seeds)",
           xlabel="stored teacher labels (bytes, log scale)", ylabel="test WER (%)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    _save_fig(fig, path)


def _plot_wer_vs_params(path: Path, rows: list[dict]) -> None:
    """Relative test WER increase over the teacher against parameter reduction, baselines vs KD students."""
    colors = _group_colors(rows)
    fig = _figure(7.5, 4.8)
    ax = fig.subplots()
    for role, marker in (("baseline", "s"), ("distilled", "o")):
        pts = sorted((r for r in rows if r["role"] == role and r["param_reduction"] and r["rel_test_wer_increase"] is not None),
                     key=lambda r: r["param_reduction"])
        for r in pts:
            ax.plot(r["param_reduction"], r["rel_test_wer_increase"], marker, ms=7, color=colors[r["group"]],
                    label=f"{r['group']} ({role}, n={r['n']})")
            ax.annotate(r["group"], (r["param_reduction"], r["rel_test_wer_increase"]), xytext=(5, 5),
                        textcoords="offset points", fontsize=8)
    ax.axhline(0.0, ls=":", lw=1.2, color="k", label="teacher")
    ax.set_xscale("log")
    ax.set(title="Relative test WER increase over the teacher vs parameter reduction",
           xlabel="parameter reduction (teacher params / student params, log scale)",
           ylabel="relative test WER increase (%)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    _save_fig(fig, path)


# --------------------------------------------------------------------------- report
def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def write_report(exp_dir: PathLike, title: Optional[str] = None, teacher_note: Optional[str] = None) -> Path:
    """Write ``EXP/report.md`` and its plots in ``EXP/plots/`` (all atomically).

    The report has: a header (experiment, when its results were written, when the report was
    generated), a table with one row per group (Model, Role, Method, Params (M), params ratio to
    the teacher, dev/test WER % as "mean ± std (n)", relative WER reduction vs the baseline %,
    RTF, label kind, label bytes), a teacher-vs-baseline line (with a warning when the teacher
    is not better: distillation has nothing to pass on), the label-storage ratio line, with ``eval.deployed`` an
    "As deployed" table (ONNX fp32 / int8 test WER, RTF and graph sizes beside PyTorch's), the
    plots ``training_curves.png`` and ``wer_vs_label_bytes.png`` and a per-run table.

    Args:
        exp_dir: experiment directory holding ``eval/*.json`` (and optional training CSVs).
        title: report title; default ``"Experiment report: <dir name>"``.
        teacher_note: a line on the teacher for the findings, written in place of "cannot compare, no teacher
            results" when there is no teacher row (e.g. a Hugging Face SSL teacher, which has no WER).

    Returns:
        Path of ``report.md``.

    Raises:
        FileNotFoundError, ValueError: as for :func:`load_results` and :func:`aggregate`.
    """
    exp = Path(exp_dir)
    results = load_results(exp)
    rows = aggregate(results)
    plots = exp / "plots"
    curve_png, wer_png = plots / "training_curves.png", plots / "wer_vs_label_bytes.png"
    notes = _plot_training_curves(curve_png, exp, results, rows)
    _plot_wer_vs_label_bytes(wer_png, rows)

    mtimes = [f.stat().st_mtime for f in (exp / "eval").glob("*.json")]
    total_train = sum(r["train_seconds"] or 0.0 for r in results)
    teacher = _single_role(rows, "teacher")
    bases = [r for r in rows if r["role"] == "baseline"]
    sizes = sorted({r["params"] for r in rows if r["role"] != "teacher"})
    size_png = plots / "wer_vs_params.png"
    if teacher is not None and len(sizes) > 1:
        _plot_wer_vs_params(size_png, rows)

    out = [f"# {title or f'Experiment report: {exp.resolve().name}'}", ""]
    out.append(f"- Experiment directory: `{exp.resolve()}`")
    first, last = _when(min(mtimes)), _when(max(mtimes))
    span = first if first == last else f"{first} to {last}"
    out.append(f"- Results written: {span} (eval JSON file times)")
    out.append(f"- Report generated: {_when(datetime.now().timestamp())}")
    total_cpu = sum(r.get("train_cpu_seconds") or 0.0 for r in results)
    out.append(
        f"- {len(results)} models in {len(rows)} groups; total training time "
        f"{total_train / 3600:.2f} h wall, {total_cpu / 3600:.2f} h CPU"
    )
    out += ["", "## Results", ""]
    header = ["Model", "Role", "Method", "Params (M)", "Params ratio to teacher", "dev WER %",
              "test WER %", "Rel. test WER reduction vs baseline %",
              "Rel. dev WER reduction vs baseline %", "RTF", "Labels", "Label bytes"]
    body = []
    for r in rows:
        is_base = r["role"] == "baseline"
        body.append([
            r["group"], r["role"], r["method"], f"{r['params'] / 1e6:.2f}",
            _fmt(r["params_ratio"], ".3f"),
            _fmt_wer(r["dev_wer_mean"], r["dev_wer_std"], r["n"]),
            _fmt_wer(r["test_wer_mean"], r["test_wer_std"], r["n"]),
            "(reference)" if is_base else _fmt(r["rel_test_wer_reduction"], "+.1f"),
            "(reference)" if is_base else _fmt(r["rel_dev_wer_reduction"], "+.1f"),
            _fmt(r["rtf_mean"], ".3f"), r["label_kind"], _fmt_bytes(r["label_bytes"]),
        ])
    out += [_table(header, body), ""]
    out.append("WER: mean ± sample std over seeds (n seeds). Relative reduction: "
               "(baseline − model) / baseline × 100 on group means; positive = better than "
               "the baseline student. RTF < 1 is faster than real time.")
    out += _sampling_error_section(exp, results, rows)
    out += ["", "## Findings", ""]

    if teacher is None or not bases:
        absent = [x for x, r in (("teacher", teacher), ("baseline", bases or None)) if r is None]
        if teacher is None and teacher_note:
            out.append(f"- {teacher_note}")
            absent.remove("teacher")
        if absent:
            out.append(f"- Teacher vs baseline: cannot compare, no {' and '.join(absent)} results.")
    else:
        for base in bases:
            t_wer, b_wer = teacher["test_wer_mean"], base["test_wer_mean"]
            who = "the baseline student's" if len(bases) == 1 else f"baseline {base['group']}'s"
            if t_wer < b_wer:
                out.append(
                    f"- Teacher test WER {t_wer:.2f}% is below {who} {b_wer:.2f}% "
                    f"(gap {b_wer - t_wer:.2f} points): the teacher has something to pass on."
                )
            else:
                out.append(
                    f"- **WARNING: the teacher's test WER ({t_wer:.2f}%) is not below {who} "
                    f"({b_wer:.2f}%): distillation has nothing to pass on.** Either the "
                    "teacher needs more training or the baseline is mis-configured; the distilled "
                    "rows compared with it do not test distillation."
                )
    f32 = [r for r in rows if r["label_kind"] == "float32" and r["label_bytes"]]
    ci = [r for r in rows if r["storage_ratio"] is not None]
    if ci:
        for r in ci:
            if f32:
                ref = min(f32, key=lambda x: x["label_bytes"])
                name, nbytes = ref["group"], ref["label_bytes"]
            else:  # no L1/L2 row: the float32 size of the same frames, recorded beside the CI result
                name, nbytes = "teacher frames", r["float32_label_bytes"]
            out.append(
                f"- Label storage: float32 labels ({name}) "
                f"{_fmt_bytes(nbytes)} vs codebook indexes ({r['group']}) "
                f"{_fmt_bytes(r['label_bytes'])}: {r['storage_ratio']:.1f}× smaller."
            )
    else:
        out.append("- Label storage ratio: n/a (needs results for both float32 and CI labels "
                   "with label_bytes).")

    if teacher is not None and len(sizes) > 1:
        out += ["", "## Size against accuracy", ""]
        out.append(_table(
            ["Model", "Role", "Params (M)", "Param reduction ×", "test WER %", "Rel. test WER increase vs teacher %",
             "Compared with"],
            [[r["group"], r["role"], f"{r['params'] / 1e6:.3f}", _fmt(r["param_reduction"], ".1f"),
              _fmt_wer(r["test_wer_mean"], r["test_wer_std"], r["n"]), _fmt(r["rel_test_wer_increase"], "+.1f"),
              r["baseline"] or ""] for r in sorted(rows, key=lambda x: -x["params"])],
        ))
        out.append("")
        out.append("Relative WER increase: (model − teacher) / teacher × 100 on test WER means (lower is better).")
    deployed = [r for r in results if r.get("deployed")]
    if deployed:
        out += ["", "## As deployed", ""]
        order_d = {r["group"]: i for i, r in enumerate(rows)}
        body = []
        for r in sorted(deployed, key=lambda x: (order_d[x["group"]], x["seed"])):
            d = r["deployed"]
            f32, i8 = d["fp32"], d["int8"]
            pt = d.get("pytorch_greedy_test_wer", r["test_wer"])
            rel = None if not f32["test_wer"] else 100 * (i8["test_wer"] - f32["test_wer"]) / f32["test_wer"]
            body.append([r["name"], _fmt(pt, ".2f"), f"{f32['test_wer']:.2f}", f"{i8['test_wer']:.2f}", _fmt(rel, "+.1f"),
                         _fmt(r["rtf"], ".4f"), f"{f32['rtf']:.4f}", f"{i8['rtf']:.4f}",
                         _fmt(None if not r["rtf"] or not i8["rtf"] else r["rtf"] / i8["rtf"], ".2f"),
                         f"{f32['bytes'] / 1e6:.2f} / {i8['bytes'] / 1e6:.2f}"])
        out.append(_table(["Name", "test WER % PyTorch", "ONNX fp32", "ONNX int8", "int8 vs fp32 rel. WER %",
                           "RTF PyTorch", "RTF ONNX fp32", "RTF ONNX int8", "int8 speed-up vs PyTorch",
                           "Graphs fp32 / int8 (MB)"], body))
        out.append("")
        out.append("Greedy search throughout. ONNX: the `speechkd export` graphs (`EXP/export/<run>`) run by onnxruntime; "
                   "int8: onnxruntime's dynamic quantization. RTF: one utterance at a time on `eval.rtf_threads` "
                   "threads, on the same utterances as the PyTorch RTF, fbank not timed.")
    out += ["", "## Plots", "",
            f"![Training curves](plots/{curve_png.name})", "",
            f"![Test WER vs label bytes](plots/{wer_png.name})", ""]
    if teacher is not None and len(sizes) > 1:
        out += [f"![Relative WER increase vs parameter reduction](plots/{size_png.name})", ""]
    out += ["## Individual runs", ""]
    order = {r["group"]: i for i, r in enumerate(rows)}
    runs = sorted(results, key=lambda r: (order[r["group"]], r["seed"]))
    out.append(_table(
        ["Name", "Group", "Seed", "dev WER %", "test WER %", "RTF", "Train wall (min)", "Train CPU (min)",
         "Epochs", "Best dev WER % (epoch)", "Dev WER change, last 5 epochs", "Notes"],
        [[r["name"], r["group"], str(r["seed"]), f"{r['dev_wer']:.2f}", f"{r['test_wer']:.2f}",
          _fmt(r["rtf"], ".3f"),
          _fmt(None if r["train_seconds"] is None else r["train_seconds"] / 60, ".1f"),
          _fmt(None if r.get("train_cpu_seconds") is None else r["train_cpu_seconds"] / 60, ".1f"),
          *_plateau(exp, r), r.get("notes") or ""] for r in runs],
    ))
    out.append("")
    out.append("Epochs, best dev WER and the change over the last 5 epochs come from the run's validation curve "
               "(`metrics.csv`): a change near 0 (against the seeds' spread) says the run had reached its plateau.")
    if notes:
        out += ["", "## Missing data", ""] + [f"- {n}" for n in notes]
    path = exp / "report.md"
    _write_text(path, "\n".join(out) + "\n")
    return path


# --------------------------------------------------------------------------- SSL (KWS + SV) experiments
SSL_REQUIRED_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), False),
    "encoder": ((str,), False),
    "mode": ((str,), False),
    "params": ((int,), False),
    "encoder_params": ((int,), False),
    "kws_accuracy": (_NUM, True),
    "sv": ((dict,), False),
    "rtf": (_NUM, True),
    "train_seconds": (_NUM, True),
}
"""Keys of an SSL experiment's ``eval/<encoder>-<mode>.json`` (written by :func:`speechkd.ssl_pipeline.evaluate`):
``kws_accuracy`` in percent (null without the KWS task), ``sv`` maps each trial list ``<corpus>/<list>`` to
``{"eer": percent, "min_dcf": float, "trials": int}``, ``params`` counts what serves every task (encoders and
heads), ``encoder_params`` one encoder."""

SSL_DEPLOYED_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "bytes": ((int,), False),
    "kws_accuracy": (_NUM, True),
    "sv_eer": (_NUM, True),
    "rtf": (_NUM, False),
}
"""Keys of each precision (``fp32``, ``int8``) of an SSL result's optional ``deployed`` block (``eval.deployed``):
graph bytes of the system's runs, KWS accuracy and mean EER in percent (null without that task), onnxruntime RTF."""

_SSL_MODES = {"frozen": "frozen encoder, one head per task", "finetune": "fine-tuned encoder per task",
              "multitask": "one encoder fine-tuned for both tasks"}


def load_ssl_results(exp_dir: PathLike) -> list[dict]:
    """Read and validate every ``EXP/eval/*.json`` of an SSL experiment (sorted by file name).

    Raises:
        FileNotFoundError: no ``EXP/eval``.
        ValueError: no result, malformed JSON, a missing key, a wrong type or a non-finite number (naming the file).
    """
    out = []
    for f, res in _read_eval_files(exp_dir):
        _check_keys(res, str(f), SSL_REQUIRED_KEYS)
        for spec, v in res["sv"].items():
            if not isinstance(v, dict) or not all(isinstance(v.get(k), _NUM) and math.isfinite(v[k])
                                                  for k in ("eer", "min_dcf")):
                raise ValueError(f"{f}: sv[{spec!r}] needs finite 'eer' and 'min_dcf'")
        if res.get("deployed") is not None:
            for q in ("fp32", "int8"):
                _check_keys(res["deployed"].get(q) if isinstance(res["deployed"], dict) else None,
                            f"{f}: deployed.{q}", SSL_DEPLOYED_KEYS)
        out.append(res)
    return out


def _plot_ssl(path: Path, results: list[dict], lists: list[str]) -> None:
    """KWS accuracy and mean SV EER against parameters, one point per system."""
    fig = _figure(11, 4.2)
    ax_kws, ax_sv = fig.subplots(1, 2)
    markers = {"frozen": "s", "finetune": "o", "multitask": "^"}
    colors = {"teacher": "black", "student": "tab:blue"}
    for r in results:
        x = r["params"] / 1e6
        style = dict(marker=markers.get(r["mode"], "D"), color=colors.get(r["encoder"], "tab:orange"), ms=8, ls="")
        if r["kws_accuracy"] is not None:
            ax_kws.plot(x, r["kws_accuracy"], label=r["name"], **style)
        if r["sv"]:
            ax_sv.plot(x, float(np.mean([r["sv"][s]["eer"] for s in lists if s in r["sv"]] or [np.nan])),
                       label=r["name"], **style)
    ax_kws.set(title="KWS accuracy (12 classes)", xlabel="parameters serving both tasks (M)", ylabel="accuracy (%)")
    ax_sv.set(title=f"SV EER (mean of {len(lists)} trial list(s))", xlabel="parameters serving both tasks (M)",
              ylabel="EER (%)")
    for ax in (ax_kws, ax_sv):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save_fig(fig, path)


def _read_step_history(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (steps, values)}`` of a step-based fit's ``metrics.csv`` (empty cells skipped)."""
    import csv

    cols: dict[str, tuple[list, list]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = _float(row.get("step"))
            for k, v in row.items():
                x = _float(v)
                if k in ("step", "lr", "epoch") or x is None or step is None:
                    continue
                cols.setdefault(k, ([], []))[0].append(step)
                cols[k][1].append(x)
    return {k: (np.array(a), np.array(b)) for k, (a, b) in cols.items()}


def _smooth(y: np.ndarray, window: int = 10) -> np.ndarray:
    """Trailing running mean over ``window`` logged points (the first points average what there is)."""
    c = np.cumsum(np.r_[0.0, y])
    n = np.arange(1, y.size + 1)
    lo = np.maximum(0, n - window)
    return (c[n] - c[lo]) / (n - lo)


def _ssl_fits(exp: Path) -> list[tuple[str, Path]]:
    """``(name, metrics.csv)`` of an SSL experiment's fits: the distillation, then every fine-tuning run."""
    fits = [("distillation", exp / "student" / "metrics.csv")]
    return fits + [(d.name, d / "metrics.csv") for d in sorted((exp / "finetune").glob("*")) if d.is_dir()
                   and not d.name.endswith(".fit")]


def _plot_ssl_curves(path: Path, exp: Path) -> list[str]:
    """Training-loss curves of the SSL stages: the student's distillation loss and every fine-tuning run's KWS and
    SV losses against the step (running mean of 10 logged points); returns the runs without a history."""
    fits = _ssl_fits(exp)
    fig = _figure(15, 4.2)
    axes = fig.subplots(1, 3)
    titles = {0: "distillation loss", 1: "KWS cross-entropy (fine-tuning)", 2: "SV AM-softmax loss (fine-tuning)"}
    missing = []
    for name, f in fits:
        if not f.is_file():
            missing.append(name)
            continue
        h = _read_step_history(f)
        if name == "distillation":
            key = "loss" if "loss" in h else next(iter(h), None)
            if key is not None:
                axes[0].plot(h[key][0], _smooth(h[key][1]), label=key, marker="." if h[key][0].size < 30 else None)
            continue
        for ax, key in ((axes[1], "kws_loss"), (axes[2], "sv_loss")):
            if key in h:
                ax.plot(h[key][0], _smooth(h[key][1]), label=name, marker="." if h[key][0].size < 30 else None)
    for i, ax in enumerate(axes):
        ax.set(title=titles[i], xlabel="optimiser step", ylabel="loss (running mean of 10 logs)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save_fig(fig, path)
    return missing


def _ssl_loss_plateau_table(exp: Path) -> list[str]:
    """Markdown lines: for the distillation and each fine-tuning run, each training loss's mean over the last
    quarter of its logged steps, over the quarter before, and the change between them (percent of the earlier):
    a change within the batches' noise says the loss had flattened. Empty without histories."""
    body = []
    for name, f in _ssl_fits(exp):
        if not f.is_file():
            continue
        h = _read_step_history(f)
        for key in ("loss", "kws_loss", "sv_loss"):
            if key not in h or h[key][1].size < 8:
                continue
            steps, y = h[key]
            q = y.size // 4
            third, last = float(y[-2 * q:-q].mean()), float(y[-q:].mean())
            body.append([name, key, f"{int(steps[-1])}", f"{int(steps[-2 * q])}-{int(steps[-q - 1])}: {third:.4f}",
                         f"{int(steps[-q])}-{int(steps[-1])}: {last:.4f}",
                         f"{100 * (last - third) / abs(third):+.1f}%" if third else "-"])
    if not body:
        return []
    return ["", "### Have the losses flattened?", "",
            _table(["Fit", "Loss", "Steps", "Mean, third quarter of the steps", "Mean, last quarter", "Change"], body),
            "", "Means of the logged per-batch losses (every 10 steps) over the last two quarters of each fit; the "
                "curves are in plots/ssl_training_curves.png."]


def _ssl_seed_table(results: list[dict], lists: list[str]) -> list[str]:
    """Markdown lines: mean ± sample sd over the fine-tuning seeds of each (encoder, mode) with more than one seed
    (``downstream.more_seeds``): KWS accuracy and the EER averaged over the trial lists. Empty without such seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["encoder"], r["mode"]), []).append(r)
    body = []
    for (enc, mode), rs in groups.items():
        if len(rs) < 2:
            continue
        cells = [f"{enc}-{mode}", ", ".join(str(r.get("finetune_seed", 0)) for r in rs)]
        kws = [r["kws_accuracy"] for r in rs if r["kws_accuracy"] is not None]
        eer = [float(np.mean([r["sv"][s]["eer"] for s in lists if s in r["sv"]])) for r in rs if r["sv"]]
        for v in (kws, eer):
            cells.append("-" if not v else _fmt_wer(*_mean_std(v), len(v)))
        body.append(cells)
    if not body:
        return []
    return ["", "### Over fine-tuning seeds", "",
            _table(["System", "Seeds", "KWS acc % (mean ± sd, n)", "EER % mean of lists (mean ± sd, n)"], body), "",
            "Sample sd over the fine-tuning seeds (the distilled student is the same for all of them)."]


def _ssl_paired_table(results: list[dict], lists: list[str]) -> list[str]:
    """Markdown lines: paired differences on the same test clips and trials, with 95% bootstrap intervals
    (:func:`~speechkd.eval.metrics.bootstrap_accuracy_interval`, :func:`~speechkd.eval.metrics.bootstrap_eer_interval`):
    student minus teacher in each mode, and each fine-tuned mode minus ``frozen`` for each encoder. Each side is the
    mean over its fine-tuning seeds, every seed scored on the same draw. Empty when the eval JSONs hold no per-clip
    results (``kws_correct``, ``sv.<list>.scores``; written since 2026-12-07)."""
    from speechkd.eval.metrics import bootstrap_accuracy_interval, bootstrap_eer_interval

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["encoder"], r["mode"]), []).append(r)
    pairs = [((("student", m), ("teacher", m)), f"student - teacher, {m}") for m in _SSL_MODES]
    pairs += [(((e, m), (e, "frozen")), f"{e}: {m} - frozen") for e in ("teacher", "student") for m in _SSL_MODES
              if m != "frozen"]
    body = []
    for (a_key, b_key), label in pairs:
        a, b = groups.get(a_key), groups.get(b_key)
        if not a or not b:
            continue
        cells = [label, f"{len(a)} / {len(b)}"]
        if all(r.get("kws_correct") is not None for r in a + b):
            ca, cb = (np.array([r["kws_correct"] for r in g]) for g in (a, b))  # (S, U) each
            diff = 100.0 * (ca.mean() - cb.mean())
            lo, hi = bootstrap_accuracy_interval(ca, baseline_correct=cb)
            cells.append(f"{diff:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        else:
            cells.append("-")
        for spec in lists:
            sa = [r["sv"].get(spec, {}).get("scores") for r in a]
            sb = [r["sv"].get(spec, {}).get("scores") for r in b]
            labels = [r["sv"].get(spec, {}).get("labels") for r in a + b]
            if any(x is None for x in sa + sb + labels) or any(x != labels[0] for x in labels):
                cells.append("-")
                continue
            diff = float(np.mean([r["sv"][spec]["eer"] for r in a]) - np.mean([r["sv"][spec]["eer"] for r in b]))
            lo, hi = bootstrap_eer_interval(np.array(sa), labels[0], baseline_scores=np.array(sb))
            cells.append(f"{diff:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]")
        if any(c != "-" for c in cells[2:]):
            body.append(cells)
    if not body:
        return []
    return ["", "### Paired differences on the same test set", "",
            _table(["Comparison", "Seeds (first / second)", "KWS acc, points [95%]"]
                   + [f"EER {s}, points [95%]" for s in lists], body), "",
            "Each side is the mean over its fine-tuning seeds; the 95% interval is a paired bootstrap over the test "
            "clips (KWS) or the trials (EER), both sides scored on the same draw, so the clips' shared difficulty "
            "cancels. It measures the test set's sampling error, not the seeds' spread. Trials sharing speakers are "
            "not independent: the EER intervals are too narrow."]


def write_ssl_report(exp_dir: PathLike, title: Optional[str] = None) -> Path:
    """Write ``EXP/report.md`` and ``EXP/plots/ssl_tasks.png`` for an SSL-distillation experiment (atomically).

    One row per system (teacher / student encoder x frozen / finetune / multitask mode): parameters serving both
    tasks and of one encoder, KWS accuracy, EER and minDCF per trial list, CPU real-time factor, fine-tuning time;
    then findings (student vs teacher, multi-task vs single-task), with ``eval.deployed`` an "As deployed" table (ONNX
    fp32 / int8 accuracy, EER, RTF and sizes beside PyTorch's), and the plot.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_ssl_results`.
    """
    exp = Path(exp_dir)
    results = load_ssl_results(exp)
    order = {("teacher", m): i for i, m in enumerate(_SSL_MODES)}
    order.update({("student", m): 10 + i for i, m in enumerate(_SSL_MODES)})
    results.sort(key=lambda r: (order.get((r["encoder"], r["mode"]), 99), r["name"]))
    lists = list(dict.fromkeys(s for r in results for s in r["sv"]))
    mtimes = [f.stat().st_mtime for f in (exp / "eval").glob("*.json")]
    out = [f"# {title or f'SSL experiment report: {exp.resolve().name}'}", ""]
    out.append(f"- Experiment directory: `{exp.resolve()}`")
    first, last = _when(min(mtimes)), _when(max(mtimes))
    out.append(f"- Results written: {first if first == last else f'{first} to {last}'} (eval JSON file times)")
    out.append(f"- Report generated: {_when(datetime.now().timestamp())}")
    out += ["", "## Results", ""]
    header = ["System", "Encoder", "Mode", "Params (M)", "Encoder params (M)", "KWS acc %"]
    header += [f"EER % ({s})" for s in lists] + [f"minDCF ({s})" for s in lists] + ["RTF", "Fine-tune time (min)"]
    body = []

    def _with_interval(value, interval):
        text = _fmt(value, ".2f")
        return text if value is None or not interval else f"{text} [{interval[0]:.2f}, {interval[1]:.2f}]"

    for r in results:
        sv = r["sv"]
        body.append([r["name"], r["encoder"], r["mode"], f"{r['params'] / 1e6:.3f}", f"{r['encoder_params'] / 1e6:.3f}",
                     _with_interval(r["kws_accuracy"], r.get("kws_interval"))]
                    + [_with_interval(sv[s]["eer"], sv[s].get("eer_interval")) if s in sv else "-" for s in lists]
                    + [_fmt(sv[s]["min_dcf"] if s in sv else None, ".3f") for s in lists]
                    + [_fmt(r["rtf"], ".4f"), _fmt(None if r["train_seconds"] is None else r["train_seconds"] / 60, ".1f")])
    out += [_table(header, body), ""]
    p_target = next((r.get("p_target") for r in results if r.get("p_target") is not None), None)
    out.append("Modes: " + "; ".join(f"`{k}` = {v}" for k, v in _SSL_MODES.items()) + ". Params (M): parameters "
               "that serve every task (a fine-tuned encoder per task counts once per task; AM-softmax speaker weights, "
               "used in training only, are not counted). KWS: 12-class Speech Commands accuracy on the test split. "
               "[brackets]: 95% intervals of the test set's sampling error: Wilson's for the KWS accuracy, a bootstrap "
               "over the trials for the EER (trials sharing speakers are not independent, so that one is too narrow). "
               "EER and minDCF" + (f" (P_target = {p_target:g}, unit costs)" if p_target else "") + " by cosine scoring of "
               "the x-vector embeddings. RTF: seconds of CPU time per second of audio for all tasks' models, one "
               "utterance at a time (< 1 is faster than real time).")
    out += _ssl_seed_table(results, lists)
    out += _ssl_paired_table(results, lists)
    out += _ssl_loss_plateau_table(exp)
    out += ["", "## Findings", ""]
    by = {(r["encoder"], r["mode"]): r for r in results if r.get("finetune_seed", 0) == min(
        x.get("finetune_seed", 0) for x in results if (x["encoder"], x["mode"]) == (r["encoder"], r["mode"]))}
    findings = []
    for mode in _SSL_MODES:
        t, s = by.get(("teacher", mode)), by.get(("student", mode))
        if t is None or s is None:
            continue
        parts = [f"student encoder {s['encoder_params'] / 1e6:.2f} M vs teacher {t['encoder_params'] / 1e6:.2f} M "
                 f"parameters ({t['encoder_params'] / max(1, s['encoder_params']):.1f}x smaller)"]
        if t["kws_accuracy"] is not None and s["kws_accuracy"] is not None:
            parts.append(f"KWS accuracy {s['kws_accuracy']:.2f}% vs {t['kws_accuracy']:.2f}%")
        parts += [f"EER ({x}) {s['sv'][x]['eer']:.2f}% vs {t['sv'][x]['eer']:.2f}%" for x in lists
                  if x in s["sv"] and x in t["sv"]]
        if t["rtf"] and s["rtf"]:
            parts.append(f"RTF {s['rtf']:.4f} vs {t['rtf']:.4f}")
        findings.append(f"- `{mode}`: " + "; ".join(parts) + ".")
    for enc in ("teacher", "student"):
        m, f = by.get((enc, "multitask")), by.get((enc, "finetune"))
        if m is None or f is None:
            continue
        parts = [f"{m['params'] / 1e6:.2f} M vs {f['params'] / 1e6:.2f} M parameters for both tasks"]
        if m["kws_accuracy"] is not None and f["kws_accuracy"] is not None:
            parts.append(f"KWS accuracy {m['kws_accuracy']:.2f}% vs {f['kws_accuracy']:.2f}%")
        parts += [f"EER ({x}) {m['sv'][x]['eer']:.2f}% vs {f['sv'][x]['eer']:.2f}%" for x in lists
                  if x in m["sv"] and x in f["sv"]]
        findings.append(f"- {enc}: multi-task vs single-task fine-tuning: " + "; ".join(parts) + ".")
    out += findings or ["- Nothing to compare yet (needs the same mode for teacher and student, or both "
                        "fine-tuning modes for one encoder)."]
    deployed = [r for r in results if r.get("deployed")]
    if deployed:
        out += ["", "## As deployed", ""]
        body = []
        for r in deployed:
            d = r["deployed"]
            row = [r["name"]]
            for key in ("kws_accuracy", "sv_eer"):
                row += [_fmt(r[key], ".2f"), _fmt(d["fp32"].get(key), ".2f"), _fmt(d["int8"].get(key), ".2f")]
            row += [_fmt(r["rtf"], ".4f"), f"{d['fp32']['rtf']:.4f}", f"{d['int8']['rtf']:.4f}",
                    f"{d['fp32']['bytes'] / 1e6:.2f} / {d['int8']['bytes'] / 1e6:.2f}"]
            body.append(row)
        out.append(_table(["System", "KWS acc % PyTorch", "ONNX fp32", "ONNX int8", "EER % (mean) PyTorch", "ONNX fp32",
                           "ONNX int8", "RTF PyTorch", "RTF ONNX fp32", "RTF ONNX int8", "Graphs fp32 / int8 (MB)"],
                          body))
        out.append("")
        out.append("ONNX: each run's `speechkd export` graph (`EXP/export/<run>`) run by onnxruntime; int8: onnxruntime's "
                   "dynamic quantization. EER: mean over the trial lists. RTF: one clip at a time on `eval.rtf_threads` "
                   "threads; a frozen system deploys one graph per task, each with the encoder, so its ONNX RTF and "
                   "size count the encoder twice where PyTorch runs it once.")
    plot = exp / "plots" / "ssl_tasks.png"
    _plot_ssl(plot, results, lists)
    curves = exp / "plots" / "ssl_training_curves.png"
    missing = _plot_ssl_curves(curves, exp)
    out += ["", "## Plots", "", f"![KWS accuracy and SV EER against parameters](plots/{plot.name})", "",
            f"![Distillation and fine-tuning losses](plots/{curves.name})", ""]
    if missing:
        out += [f"No training history for: {', '.join(missing)}.", ""]
    path = exp / "report.md"
    _write_text(path, "\n".join(out) + "\n")
    return path


def main(argv: Optional[list[str]] = None) -> None:
    """CLI: ``python -m speechkd.report EXP [--title T]``; prints the report path."""
    ap = argparse.ArgumentParser(description="Write EXP/report.md and EXP/plots/*.png")
    ap.add_argument("exp_dir")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    print(write_report(args.exp_dir, title=args.title))


if __name__ == "__main__":
    main()
