"""MQAR recall against inference-state size, over every registered mixer (`memzoo sweep mqar`).

    rows = run_sweep(PRESETS["quick"](), "runs/sweep-mqar-quick")

For each mixer in memzoo.models.mixers.MIXERS (a mixer whose module does not import yet is
skipped with a note), each width and each learning rate of the preset, one MQAR run
(memzoo.eval.runner.run_mqar) in `<out>/runs/<mixer>-d<width>/lr<lr>/`. The output directory
holds:

    sweep.json          the preset's task and mixer settings (a later run must match them)
    results.csv         one row per (mixer, width, lr, test slice); rewritten atomically after
                        every finished run, read back on start: finished runs are skipped
    results.md          per (mixer, width), the best learning rate's accuracy and state size,
                        and the JRT gain (accuracy change with the context read twice)
    recall_vs_state.png accuracy against state size per test slice, Pareto frontier drawn

Presets (per-mixer settings apply to every width; `+conv` = zoology's Hybrid, a gated short
convolution before the mixer in every block; ffn none, as in zoology's MQAR models):

| mixer       | +conv | options (quick)                  | options (paper)                  |
|-------------|-------|----------------------------------|----------------------------------|
| attn        | yes   | defaults (head dim 64)           | defaults                         |
| swa         | yes   | window 8 (a quarter of T = 32)   | window 64                        |
| linear_attn | yes   | defaults (4 heads, elu, dim 16)  | defaults                         |
| based       | yes   | 1 head (zoology), feature dim 16 | 1 head                           |
| short_conv  | no    | defaults (width 3): a baseline   | defaults                         |
| mamba       | no    | d_state 8 (zoology: 8, 16, 24)   | d_state 16                       |
| mamba2      | no    | d_state 16                       | d_state 16                       |
| jrt         | yes   | 1 head, prefix_len 8 = context   | 1 head, prefix_len 32            |
| mom         | yes   | defaults (4 memories, top 2)     | defaults                         |
| memmamba    | no    | Mamba d_state 8                  | defaults                         |

- quick (CPU): vocab 64, train T=32 with 4 pairs (9600 examples: one epoch of 150 batches of
  64), test 256 examples of the same slice; widths 64 and 128 (at width 32 even attention did
  not learn T=64 with 8 pairs in 500 steps); one learning rate, 3e-3 (5e-3 and 1e-2 left
  width-64 attention at chance in some runs). 150 steps leave the recurrent layers
  under-trained (zoology trains for thousands): the quick sweep ranks what learns recall fast
  as much as what can hold it. Its cost is dominated by the CPU paths of mamba, mom and
  memmamba (see benchmarks/results/mqar_quick_sweep.md).
- paper (GPU; the BASED paper's figure 2 / zoology setup): vocab 8192; train T=64 kv=4
  (100k), T=128 kv=8, T=256 kv=16, 32, 64 (20k each); test 1000 each of T=64 kv=4, 8, 16,
  T=128 kv=32, T=256 kv=64, T=512 kv=64; batch 256, 32 epochs; widths 64, 128, 256, 512;
  learning rates 1e-3, 3.2e-3, 1e-2, 3.2e-2 (zoology's logspace(-3, -1.5, 4)).
  JRT's prefix of 32 tokens is the context of 16 pairs: longer contexts are read twice only
  in part, and in shorter ones outputs inside the prefix also see the next few query-region
  tokens (never an answer: values are not repeated after the context).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memzoo.eval.mqar import MQARConfig
from memzoo.eval.runner import MQARModel, MQARResult, MQARTask, run_mqar
from memzoo.models.mixers import MIXERS, mixer_class

__all__ = [
    "PRESETS",
    "MixerSetting",
    "SweepPreset",
    "best_per_model",
    "read_results",
    "run_sweep",
    "write_table",
]

RESULTS_CSV = "results.csv"
TABLE_MD = "results.md"
PLOT_PNG = "recall_vs_state.png"
SETTINGS_JSON = "sweep.json"
COLUMNS = [
    "mixer",
    "model",
    "d_model",
    "lr",
    "slice",
    "seq_len",
    "num_kv_pairs",
    "accuracy",
    "accuracy_twice",
    "state_size",
    "params",
    "steps",
    "seconds",
    "stopped_early",
]
_TYPES = {
    "d_model": int,
    "lr": float,
    "seq_len": int,
    "num_kv_pairs": int,
    "accuracy": float,
    "accuracy_twice": float,
    "state_size": int,
    "params": int,
    "steps": int,
    "seconds": float,
}


@dataclass
class MixerSetting:
    """How a sweep builds one mixer: its options and whether a short conv precedes it."""

    options: dict = field(default_factory=dict)
    short_conv: bool = False


@dataclass
class SweepPreset:
    """A sweep: the task, the widths, the learning rates and the per-mixer settings (a mixer
    without an entry runs with its defaults and no short conv)."""

    name: str
    task: MQARTask
    widths: Sequence[int]
    lrs: Sequence[float]
    mixers: dict[str, MixerSetting] = field(default_factory=dict)

    def model(self, mixer: str, width: int) -> MQARModel:
        setting = self.mixers.get(mixer, MixerSetting())
        return MQARModel(mixer, width, dict(setting.options), short_conv=setting.short_conv)

    def settings(self) -> dict:
        """Everything that decides a run's result, as JSON-ready data."""
        task = asdict(self.task)
        task["train"] = [c.to_dict() for c in self.task.train]
        task["test"] = [c.to_dict() for c in self.task.test]
        return {
            "preset": self.name,
            "task": task,
            "mixers": {name: asdict(s) for name, s in sorted(self.mixers.items())},
        }


def describe_model(model: MQARModel) -> str:
    """A short label of the model's block: `short_conv+swa(window=16)`."""
    options = ", ".join(f"{k}={v}" for k, v in sorted(model.mixer_options.items()))
    name = f"{model.mixer}({options})" if options else model.mixer
    return f"short_conv+{name}" if model.short_conv else name


def _conv(**options) -> MixerSetting:
    return MixerSetting(options, short_conv=True)


def _quick() -> SweepPreset:
    slice_ = dict(vocab_size=64, seq_len=32, num_kv_pairs=4)
    task = MQARTask(
        train=[MQARConfig(**slice_, num_examples=9600)],
        test=[MQARConfig(**slice_, num_examples=256)],
        batch_size=64,
        epochs=1,
        eval_every=50,
    )
    mixers = {
        "attn": _conv(),
        "swa": _conv(window=8),
        "linear_attn": _conv(),
        "based": _conv(num_heads=1),
        "short_conv": MixerSetting(),
        "mamba": MixerSetting({"d_state": 8}),
        "mamba2": MixerSetting({"d_state": 16}),
        "jrt": _conv(num_heads=1, prefix_len=8),
        "mom": _conv(),
        "memmamba": MixerSetting({"ssm_options": {"d_state": 8}}),
    }
    return SweepPreset("quick", task, widths=(64, 128), lrs=(3e-3,), mixers=mixers)


def _paper() -> SweepPreset:
    V = 8192
    train = [
        (64, 4, 100_000),
        (128, 8, 20_000),
        (256, 16, 20_000),
        (256, 32, 20_000),
        (256, 64, 20_000),
    ]
    test = [(64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 64)]
    task = MQARTask(
        train=[MQARConfig(V, T, kv, num_examples=n) for T, kv, n in train],
        test=[MQARConfig(V, T, kv, num_examples=1000) for T, kv in test],
        batch_size=256,
        epochs=32,
        eval_every=1000,
    )
    mixers = {
        "attn": _conv(),
        "swa": _conv(window=64),
        "linear_attn": _conv(),
        "based": _conv(num_heads=1),
        "short_conv": MixerSetting(),
        "mamba": MixerSetting({"d_state": 16}),
        "mamba2": MixerSetting({"d_state": 16}),
        "jrt": _conv(num_heads=1, prefix_len=32),
        "mom": _conv(),
        "memmamba": MixerSetting(),
    }
    return SweepPreset(
        "paper", task, widths=(64, 128, 256, 512), lrs=(1e-3, 3.2e-3, 1e-2, 3.2e-2), mixers=mixers
    )


PRESETS: dict[str, Callable[[], SweepPreset]] = {"quick": _quick, "paper": _paper}


# ---- results.csv ---------------------------------------------------------------------------


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_results(path: str | Path) -> list[dict]:
    """The rows of a results.csv, typed (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for raw in csv.DictReader(io.StringIO(path.read_text())):
        # An empty cell (accuracy_twice of a multi-pass slice, or of an older file) is None.
        row = {k: None if v in ("", None) else _TYPES.get(k, str)(v) for k, v in raw.items()}
        row["stopped_early"] = raw["stopped_early"] == "True"
        rows.append(row)
    return rows


def _write_results(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_text(path, out.getvalue())


def _result_rows(result: MQARResult, model: MQARModel, test: Sequence[MQARConfig]) -> list[dict]:
    return [
        {
            "mixer": result.mixer,
            "model": describe_model(model),
            "d_model": result.d_model,
            "lr": result.lr,
            "slice": c.name,
            "seq_len": c.seq_len,
            "num_kv_pairs": c.num_kv_pairs,
            "accuracy": round(result.slice_accuracy[c.name], 6),
            "accuracy_twice": round(result.jrt[c.name].repeated, 6) if c.name in result.jrt else "",
            "state_size": result.state_size[c.name],
            "params": result.params,
            "steps": result.steps,
            "seconds": round(result.seconds, 2),
            "stopped_early": result.stopped_early,
        }
        for c in test
    ]


# ---- summaries -----------------------------------------------------------------------------


def best_per_model(rows: Sequence[dict]) -> list[dict]:
    """Per (mixer, model, d_model), sorted by mixer then width: the learning rate with the
    best mean accuracy over the test slices (the smaller lr among ties), as {mixer, model,
    d_model, lr, params, accuracy, state_size, seq_len (each {slice: value}), mean_accuracy,
    jrt_gain (mean over the slices read twice of twice - once; None when none was),
    seconds (summed over all learning rates)}."""
    grouped: dict[tuple, dict[float, list[dict]]] = {}
    for row in rows:
        key = (row["mixer"], row["model"], row["d_model"])
        grouped.setdefault(key, {}).setdefault(row["lr"], []).append(row)
    summary = []
    for (mixer, model, width), by_lr in grouped.items():
        means = {lr: sum(r["accuracy"] for r in run) / len(run) for lr, run in by_lr.items()}
        lr = max(means, key=lambda lr: (means[lr], -lr))
        chosen = by_lr[lr]
        gains = [
            r["accuracy_twice"] - r["accuracy"]
            for r in chosen
            if r.get("accuracy_twice") is not None
        ]
        gain = sum(gains) / len(gains) if gains else None
        summary.append(
            {
                "mixer": mixer,
                "model": model,
                "d_model": width,
                "lr": lr,
                "params": chosen[0]["params"],
                "accuracy": {r["slice"]: r["accuracy"] for r in chosen},
                "state_size": {r["slice"]: r["state_size"] for r in chosen},
                "seq_len": {r["slice"]: r["seq_len"] for r in chosen},
                "mean_accuracy": means[lr],
                "jrt_gain": gain,
                "seconds": sum(run[0]["seconds"] for run in by_lr.values()),
            }
        )
    return sorted(summary, key=lambda s: (s["mixer"], s["d_model"]))


def write_table(rows: Sequence[dict], path: str | Path, *, title: str) -> str:
    """The markdown table of `best_per_model(rows)` under `# title`, written atomically;
    returns its text. State sizes are floats per sequence at each test length; "JRT gain" is
    the mean accuracy change when the key-value context is read twice (JRT-Prompt)."""
    summary = best_per_model(rows)
    slices = list(dict.fromkeys(r["slice"] for r in rows))
    lengths = sorted({r["seq_len"] for r in rows})
    head = [
        "mixer",
        "block",
        "d_model",
        "params",
        *(f"state @T={T}" for T in lengths),
        "lr",
        *slices,
        "mean",
        "JRT gain",
        "time (s)",
    ]
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
    ]
    for s in summary:
        state = {s["seq_len"][name]: size for name, size in s["state_size"].items()}
        cells = [
            s["mixer"],
            f"`{s['model']}`",
            str(s["d_model"]),
            f"{s['params']:,}",
            *(f"{state[T]:,}" if T in state else "" for T in lengths),
            f"{s['lr']:.1e}",
            *(f"{s['accuracy'][name]:.3f}" if name in s["accuracy"] else "" for name in slices),
            f"{s['mean_accuracy']:.3f}",
            "" if s["jrt_gain"] is None else f"{s['jrt_gain']:+.3f}",
            f"{s['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    _atomic_text(Path(path), text)
    return text


# ---- the sweep -----------------------------------------------------------------------------


def _check_settings(out: Path, preset: SweepPreset) -> None:
    """Record the preset's settings in out/sweep.json, or check they match those recorded:
    results of other settings must not be skipped as if they were this sweep's."""
    path, settings = out / SETTINGS_JSON, preset.settings()
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != json.loads(json.dumps(settings)):
            raise ValueError(
                f"{out} holds a sweep with other settings ({path}); pass another output "
                "directory, or delete it to start over"
            )
        return
    _atomic_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _print(line: str) -> None:
    print(line, flush=True)  # progress shows up at once even when stdout is a file


def _importable(name: str, log: Callable[[str], None]) -> bool:
    try:
        mixer_class(name)
    except ImportError as error:
        log(f"skip {name}: its module does not import yet ({error})")
        return False
    return True


def run_sweep(
    preset: SweepPreset,
    out_dir: str | Path,
    *,
    mixers: Sequence[str] | None = None,
    device: str | None = None,
    log: Callable[[str], None] = _print,
) -> list[dict]:
    """Run every (mixer, width, lr) of `preset` not already in out_dir/results.csv, then
    write the table and the plot. mixers: a subset of MIXERS (default: all of them).
    Returns all rows of results.csv."""
    from memzoo.eval.plots import plot_recall_vs_state

    names = list(MIXERS) if mixers is None else list(mixers)
    unknown = [n for n in names if n not in MIXERS]
    if unknown:
        raise ValueError(
            f"run_sweep: unknown mixer(s) {', '.join(unknown)}; valid: {', '.join(MIXERS)}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, preset)
    csv_path = out / RESULTS_CSV
    rows = read_results(csv_path)
    done = {(r["model"], r["d_model"], r["lr"]) for r in rows}
    data = None
    started = time.perf_counter()
    for name in names:
        if not _importable(name, log):
            continue
        for width in preset.widths:
            model = preset.model(name, width)
            for lr in preset.lrs:
                where = f"{name:<12} d={width:<4} lr={lr:.1e}"
                if (describe_model(model), width, lr) in done:
                    log(f"{where}  done before, skipped")
                    continue
                data = preset.task.make_data() if data is None else data
                run_dir = out / "runs" / f"{name}-d{width}" / f"lr{lr:.1e}"
                result = run_mqar(model, preset.task, lr, run_dir, data=data, device=device)
                rows += _result_rows(result, model, preset.task.test)
                _write_results(csv_path, rows)
                state = max(result.state_size.values())
                twice = [g.repeated for g in result.jrt.values()]
                read_twice = f"  read twice {sum(twice) / len(twice):.3f}" if twice else ""
                log(
                    f"{where}  accuracy {result.accuracy:.3f}{read_twice}  state {state:,}  "
                    f"{result.steps} steps  {result.seconds:.0f} s"
                )
    if rows:
        write_table(rows, out / TABLE_MD, title=f"MQAR sweep `{preset.name}`")
        plot_recall_vs_state(best_per_model(rows), out / PLOT_PNG, title=f"MQAR: {preset.name}")
        log(
            f"sweep {preset.name}: {time.perf_counter() - started:.0f} s; table "
            f"{out / TABLE_MD}, plot {out / PLOT_PNG}"
        )
    return rows
