"""Memory fidelity: how much of a token an LM still carries later in time (horizontal, within a
layer) and higher up (vertical, across layers), measured by Jacobian norms.

The MemMamba paper (Wang et al. 2025, arXiv:2510.03279) introduces horizontal (ETMF: token
memory fidelity within a layer over time) and vertical (ECLMF: cross-layer) fidelity in
information-theoretic terms. These are computable versions. For an LM with L layers let
e_t be the token embedding (the input of layer 0), h^l_t the residual stream after layer l
(h^-1 = e), d the model width, and s = T - 1 the last position of each input sequence (it
follows every other token). Then, for distance delta = 0 .. max_distance:

    horizontal[l, delta] = sqrt(E_n ||dh^l_s / dh^(l-1)_(s-delta)||_F^2)
                           / sqrt(E_n ||dh^l_s / dh^(l-1)_s||_F^2)
    vertical[l, delta]   = sqrt(E_n ||dh^l_s / de_(s-delta)||_F^2) / sqrt(d)

E_n is the mean over the N input sequences. Horizontal is one layer on its own: how strongly
its output at s still depends on its input delta tokens back, relative to the token itself.
Vertical follows a token through the whole stack, relative to the embedding itself
(||de_s / de_s||_F = sqrt(d)): at delta = 0 how much of the token survives to depth l, at
delta > 0 how much of a token delta back reaches layer l's output (through any mixing at or
below l, cross-layer reads included).

Properties: horizontal[l, 0] = 1. horizontal[l, delta] = 0 exactly when layer l's output at s
ignores its input delta tokens back (a layer that sees no past: 0 for every delta > 0; a
width-W convolution: 0 for delta >= W). A Mamba layer decays roughly exponentially in delta;
MemMamba's note reads keep selected tokens visible up to K notes back.

Estimation: ||J||_F^2 = E_u ||J^T u||^2 for u ~ N(0, I_d) (Hutchinson), and one backward pass
from u . h^l_s gives J^T u at every earlier position at once. Each sequence is copied once per
probe (the copies run as one batch); `num_probes=None` uses the d basis vectors as probes
instead, which is exact.

    result = memory_fidelity(model, input_ids, max_distance=128, num_probes=8)
    result.horizontal      # [L, 129]
    memzoo eval fidelity --checkpoint runs/mamba-tiny --checkpoint runs/memmamba-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from memzoo.models.lm import LM

__all__ = [
    "FidelityResult",
    "add_fidelity_parser",
    "load_model",
    "memory_fidelity",
    "plot_fidelity",
    "run_fidelity",
    "write_fidelity",
]


@dataclass
class FidelityResult:
    """horizontal, vertical: `[L, max_distance + 1]` float64 (rows: layers; columns: distance
    0 .. max_distance); layers: each layer's mixer names ("mamba", "memmamba+swa", ...)."""

    horizontal: torch.Tensor
    vertical: torch.Tensor
    layers: list[str]

    @property
    def distances(self) -> list[int]:
        return list(range(self.horizontal.shape[1]))

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "distances": self.distances,
            "horizontal": self.horizontal.tolist(),
            "vertical": self.vertical.tolist(),
        }


# --------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------


def _check_inputs(model, input_ids, max_distance, num_probes) -> int:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
        raise ValueError(f"memory_fidelity: input_ids must be [N, T] with T >= 1, got {shape!r}")
    T = input_ids.shape[1]
    max_distance = T - 1 if max_distance is None else max_distance
    if not isinstance(max_distance, int) or not 0 <= max_distance <= T - 1:
        raise ValueError(
            f"memory_fidelity: max_distance must be an int in [0, T - 1 = {T - 1}], "
            f"got {max_distance!r}"
        )
    if num_probes is not None and (not isinstance(num_probes, int) or num_probes < 1):
        raise ValueError(
            f"memory_fidelity: num_probes must be an int >= 1 or None (exact), got {num_probes!r}"
        )
    if not isinstance(model, LM):
        raise TypeError(f"memory_fidelity: model must be a memzoo LM, got {type(model).__name__}")
    return max_distance


def _probes(num_seqs: int, d: int, num_probes: int | None, seed: int, like: torch.Tensor):
    """(u `[num_seqs * P, d]`, weight): probes for copies (n, p), sequence-major, and the
    factor that turns sum_p ||J^T u_p||^2 into ||J||_F^2 (1 for basis vectors, 1/P else)."""
    if num_probes is None:
        return torch.eye(d, dtype=like.dtype, device=like.device).repeat(num_seqs, 1), 1.0
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(num_seqs * num_probes, d, generator=generator, dtype=torch.float64)
    return u.to(device=like.device, dtype=like.dtype), 1.0 / num_probes


def _frobenius_squared(grad, num_seqs: int, weight: float, max_distance: int) -> torch.Tensor:
    """E_n ||J_(s, s - delta)||_F^2 `[max_distance + 1]` from grad = J^T u, `[N * P, T, d]`."""
    s = grad.shape[1] - 1
    at = grad[:, s - torch.arange(max_distance + 1, device=grad.device)]  # [N * P, D + 1, d]
    squared = at.double().pow(2).sum(-1).view(num_seqs, -1, max_distance + 1)
    return squared.sum(1).mul(weight).mean(0).cpu()


@torch.no_grad()
def _layer_inputs(model: LM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """[e, h^0, ..., h^(L-1)]: the embedding and every layer's output."""
    streams = [model.embed(input_ids)]
    for block in model.blocks:
        streams.append(block(streams[-1]))
    return streams


def memory_fidelity(
    model: LM,
    input_ids: torch.Tensor,
    *,
    max_distance: int | None = None,
    num_probes: int | None = 8,
    seed: int = 0,
) -> FidelityResult:
    """Horizontal and vertical memory fidelity of `model` on `input_ids` (module docstring).

    Args:
        model: a memzoo LM (run in eval mode; its training flag is restored afterwards).
        input_ids: `[N, T]` token ids; every sequence is measured from its last position.
        max_distance: the largest distance delta, <= T - 1 (default T - 1).
        num_probes: Gaussian probes per sequence (the batch is N * num_probes copies), or
            None for the d basis vectors (exact, N * d copies).
        seed: seeds the probes.

    Returns:
        FidelityResult with horizontal and vertical `[L, max_distance + 1]` (float64, CPU).
    """
    max_distance = _check_inputs(model, input_ids, max_distance, num_probes)
    N = input_ids.shape[0]
    d = model.config.d_model
    layers = ["+".join(m.name for m in block.mixers) or "ffn" for block in model.blocks]
    was_training = model.training
    model.eval()
    try:
        u, weight = _probes(N, d, num_probes, seed, model.embed.weight)
        copies = input_ids.repeat_interleave(u.shape[0] // N, dim=0)
        s = input_ids.shape[1] - 1
        streams = _layer_inputs(model, copies)
        with torch.enable_grad():
            horizontal = []
            # Layers rerun in order on their recorded inputs, so each layer reads earlier
            # layers' note pools (MemMamba) as they were for this very input.
            for block, x in zip(model.blocks, streams[:-1], strict=True):
                x = x.detach().requires_grad_()
                (grad,) = torch.autograd.grad((block(x)[:, s] * u).sum(), x)
                squared = _frobenius_squared(grad, N, weight, max_distance)
                horizontal.append((squared / squared[0]).sqrt())

            embedded = streams[0].detach().requires_grad_()
            outputs, x = [], embedded
            for block in model.blocks:
                x = block(x)
                outputs.append(x)
            vertical = []
            for i, h in enumerate(outputs):
                (grad,) = torch.autograd.grad(
                    (h[:, s] * u).sum(), embedded, retain_graph=i + 1 < len(outputs)
                )
                vertical.append((_frobenius_squared(grad, N, weight, max_distance) / d).sqrt())
    finally:
        model.train(was_training)
    return FidelityResult(torch.stack(horizontal), torch.stack(vertical), layers)


# --------------------------------------------------------------------------------------
# Checkpoints, inputs, plots and the command
# --------------------------------------------------------------------------------------


def load_model(path: str | Path, *, device: str | torch.device = "cpu"):
    """(LM in eval mode, its tokenizer or None) from a directory: `LM.save_pretrained` output
    (config.json; the tokenizer only if a tokenizer.json sits beside it), a trainer checkpoint,
    or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        from memzoo.train.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
        return LM.from_pretrained(path, device=device).eval(), tokenizer
    from memzoo.train.pretrained import load_trained_lm

    model, tokenizer, _ = load_trained_lm(path, device=device)
    return model, tokenizer


def input_batch(
    vocab_size: int,
    num_seqs: int,
    seq_len: int,
    *,
    seed: int = 0,
    text_ids: list[int] | None = None,
) -> torch.Tensor:
    """`[num_seqs, seq_len]` token ids: consecutive windows of `text_ids`, or uniform random
    ids in [0, vocab_size) from `seed`."""
    if text_ids is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (num_seqs, seq_len), generator=generator)
    needed = num_seqs * seq_len
    if len(text_ids) < needed:
        raise ValueError(
            f"the text has {len(text_ids)} tokens, fewer than num_seqs * seq_len = {needed}"
        )
    return torch.tensor(text_ids[:needed]).view(num_seqs, seq_len)


def plot_fidelity(results: dict[str, FidelityResult], path: str | Path) -> Path:
    """PNG: horizontal fidelity vs distance (mean over layers) and vertical fidelity vs layer
    (at distance 0 and at the largest distance), one line per model; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for i, (label, result) in enumerate(results.items()):
        color = f"C{i}"
        horizontal = result.horizontal.mean(0).clamp(min=1e-12)
        left.plot(result.distances, horizontal, color=color, label=label, linewidth=1.3)
        layers = range(result.vertical.shape[0])
        far = result.distances[-1]
        right.plot(layers, result.vertical[:, 0], "o-", color=color, label=f"{label}, delta 0")
        if far > 0:
            right.plot(
                layers, result.vertical[:, far].clamp(min=1e-12), "s--", color=color,
                label=f"{label}, delta {far}",
            )  # fmt: skip
    left.set_yscale("log")
    left.set_xlabel("distance delta (tokens)")
    left.set_ylabel("horizontal fidelity (mean over layers)")
    right.set_yscale("log")
    right.set_xlabel("layer")
    right.set_ylabel("vertical fidelity")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def write_fidelity(
    results: dict[str, FidelityResult], directory: str | Path, meta: dict | None = None
) -> tuple[Path, Path]:
    """fidelity.json (every model's metrics, plus `meta`) and fidelity.png in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta or {}, "models": {k: r.to_dict() for k, r in results.items()}}
    json_path = directory / "fidelity.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fidelity.json.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(tmp, json_path)
    return json_path, plot_fidelity(results, directory / "fidelity.png")


def run_fidelity(args: argparse.Namespace) -> int:
    """`memzoo eval fidelity`: measure every --checkpoint on the same inputs, write and plot."""
    from memzoo.train.checkpoint import CheckpointError

    labels = args.label or []
    if labels and len(labels) != len(args.checkpoint):
        print("memzoo eval fidelity: error: give one --label per --checkpoint", file=sys.stderr)
        return 2
    results: dict[str, FidelityResult] = {}
    try:
        for i, checkpoint in enumerate(args.checkpoint):
            model, tokenizer = load_model(checkpoint, device=args.device)
            text_ids = None
            if args.text is not None:
                if tokenizer is None:
                    raise FileNotFoundError(f"--text needs a tokenizer.json with {checkpoint}")
                text_ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))
            ids = input_batch(
                model.config.vocab_size, args.num_seqs, args.seq_len, seed=args.seed,
                text_ids=text_ids,
            ).to(args.device)  # fmt: skip
            label = labels[i] if labels else Path(checkpoint).name
            results[label] = memory_fidelity(
                model,
                ids,
                max_distance=args.max_distance,
                num_probes=None if args.probes == 0 else args.probes,
                seed=args.seed,
            )
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        print(f"memzoo eval fidelity: error: {error}", file=sys.stderr)
        return 1
    meta = {k: v for k, v in vars(args).items() if k not in ("run",)}
    json_path, png_path = write_fidelity(results, args.out, meta)
    for label, result in results.items():
        far = result.distances[-1]
        print(
            f"{label}: horizontal at delta {far} (mean over layers) "
            f"{result.horizontal[:, far].mean():.3e}; vertical at the last layer, delta 0 "
            f"{result.vertical[-1, 0]:.3f}, delta {far} {result.vertical[-1, far]:.3e}"
        )
    print(f"wrote {json_path} and {png_path}")
    return 0


def add_fidelity_parser(subparsers) -> argparse.ArgumentParser:
    """Register `fidelity` on an argparse subparsers action (the `memzoo eval` group)."""
    p = subparsers.add_parser(
        "fidelity",
        help="horizontal / vertical memory fidelity of LM checkpoints",
        description="Memory fidelity (Jacobian-norm ratios, see memzoo.eval.fidelity) of one "
        "or more checkpoints on the same inputs; writes fidelity.json and fidelity.png.",
    )
    p.add_argument(
        "--checkpoint", action="append", required=True, metavar="DIR",
        help="LM.save_pretrained dir, trainer checkpoint or run dir (repeat to compare models)",
    )  # fmt: skip
    p.add_argument("--label", action="append", help="a name per --checkpoint for the plot")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--num-seqs", type=int, default=4, help="sequences averaged over (4)")
    p.add_argument("--max-distance", type=int, help="largest distance (default seq-len - 1)")
    p.add_argument("--probes", type=int, default=8, help="probes per sequence; 0 = exact (8)")
    p.add_argument("--text", help="a text file to take the sequences from (default: random ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/fidelity", help="output directory (runs/fidelity)")
    p.set_defaults(run=run_fidelity)
    return p
