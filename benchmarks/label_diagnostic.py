"""Do a finished siamese-soft run's soft labels carry lesion signal? The end-of-run label diagnostic.

For every siamese-soft run of a study folder (`runs/<arm>/seed<k>/`: the method and its ablation arms): rebuild the method from `last.pt` (both networks
and their final mixtures), score the study's labelled test pairs with `train.diagnostics.LabelProbe` (the
same code as the training loop's `--val-where` hook: centre crops, eval mode) and print, per network, the
mixture (means, variances, weights), the share of test pairs labelled dissimilar (s < 0.5), and the ROC AUC of
`1 - s` and of the pair distance `d` for lesion pairs. A label that carries signal has AUC(1 - s) above 0.5.

    python benchmarks/label_diagnostic.py --study study250/study --manifest study250/manifests/samples.parquet

Labels are read here only (evaluation); nothing is written back into the runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from train.checkpoint import last_checkpoint, load_checkpoint, run_config
from train.config import PretrainConfig
from train.diagnostics import LabelProbe, load_validation_pairs
from train.methods import get_method


def rebuild(run: Path) -> tuple[torch.nn.Module, PretrainConfig, dict]:
    """The method of `run` as its last checkpoint left it, and the checkpoint's extra state."""
    known = {f for f in PretrainConfig.__dataclass_fields__}
    cfg = PretrainConfig(**{k: v for k, v in run_config(run).items() if k in known})
    ckpt = load_checkpoint(last_checkpoint(run), map_location="cpu")
    method = get_method(cfg.method)(cfg)
    method.load_state_dict(ckpt["method"])
    method.load_extra_state(ckpt["extra"])
    return method, cfg, ckpt["extra"]


def mixture_summary(extra: dict) -> dict:
    """Each labeller's final mixture (`train.gmm.Mixture.as_tensor` rows: means, variances, weights)."""
    out = {}
    for key, state in sorted(extra.items()):
        if state.get("mixture") is not None:
            means, variances, weights = state["mixture"].tolist()
            out[key] = {"means": [round(v, 3) for v in means], "variances": [round(v, 4) for v in variances],
                        "weights": [round(v, 3) for v in weights]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="study folder holding runs/<arm>/seed*/")
    parser.add_argument("--manifest", required=True, help="the build's samples.parquet")
    parser.add_argument("--where", default="split == 'test' and sampling == 'grid'",
                        help="labelled pairs to score (default: the test split's grid pairs)")
    parser.add_argument("--max-pairs", type=int, default=2000)
    args = parser.parse_args()
    runs = [run for run in sorted((args.study / "runs").glob("*/seed*"))
            if run_config(run).get("method") == "siamese-soft" and last_checkpoint(run) is not None]
    if not runs:
        raise SystemExit(f"no finished siamese-soft runs under {args.study / 'runs'}")
    pairs = None
    for run in runs:
        method, cfg, extra = rebuild(run)
        if pairs is None:
            pairs = load_validation_pairs(args.manifest, args.where, str(Path(cfg.shards)), cfg.crop_px or 56,
                                          args.max_pairs)
            print(pairs.describe())
        record = LabelProbe(pairs, torch.device("cpu")).run(method)
        print(json.dumps({"arm": run.parent.name, "seed": run.name, "mixtures": mixture_summary(extra),
                          **{k: round(v, 3) for k, v in record.items()}}))


if __name__ == "__main__":
    main()
