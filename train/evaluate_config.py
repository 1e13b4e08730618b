"""`EvaluateConfig`: every knob of `train evaluate`, declared once with `prep.knobs.knob` (help, `--help`
panel, range or choices in the field's metadata). `train/commands/evaluate.py` generates the Typer options
from it and `validate()` checks any config, however it was built (CLI, `pipelines.study`, tests). Torch-free,
so `train --help` stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prep.knobs import check_knobs, knob, refuse_first


@dataclass(frozen=True)
class EvaluateConfig:
    # input and output
    # `required`: the command cannot run without them (a library caller may leave them unset: `compute_metrics`
    # needs neither)
    encoder: str | None = knob(None, "Run dir (uses its encoder.safetensors, else last.pt) or an encoder.safetensors file.", "Input and output", required=True)
    shards: str | None = knob(None, "Shard dir (recursive *.tar), glob or tar; with --manifest, the folder relative shard paths resolve against. Default: none.", "Input and output")
    manifest: str | None = knob(None, "samples.parquet (a path or a URL): evaluate exactly its rows, labels from the manifest. Default: none (every sample of --shards).", "Input and output")
    out: str | None = knob(None, "Output dir (local) for metrics.json, scores.parquet, report.md and the PNG figures.", "Input and output", required=True)
    train_split: str = knob("training", "Split the probes are fitted on.", "Input and output")
    test_split: str = knob("test", "Split the probes and detection are scored on.", "Input and output")
    detection_only: bool = knob(False, "Embed the test split of --manifest only: detection AUCs and pixel baselines, no probes or kNN (fast, for ablations).", "Input and output", flag="--detection-only")
    # heat map
    root: str | None = knob(None, "Archive root for the whole-breast heat map (one study with a lesion). Default: none, heat map skipped.", "Heat map")
    dataset: str = knob("vindr", "Dataset adapter of --root (prep.datasets).", "Heat map")
    heatmap_study: str | None = knob(None, "Study id for the heat map. Default: the first test study with a finding.", "Heat map")
    heatmap_patches: int = knob(256, "Grid pairs cut over the heat-map breast.", "Heat map", min=4)
    assume_spacing_mm: float | None = knob(None, "Heat map only: pixel spacing (mm) for --root images whose header has none (CBIS-DDSM), as for prep build-shards; the report notes it was assumed. Default: none (such images are refused).", "Heat map", min=0.001)
    # metrics
    label_fractions: tuple[float, ...] = knob((0.01, 0.1, 1.0), "Fractions of the training grid labels for the abnormal probe (repeatable).", "Metrics", flag="--label-fraction", min=1e-6, max=1.0)
    n_boot: int = knob(2000, "Study-level bootstrap resamples for the 95 % CIs (2,000 leaves 50 resamples in each 2.5 % tail).", "Metrics", min=0)
    seed: int = knob(0, "Seed of the label subsamples, CV folds and bootstrap.", "Metrics")
    knn_k: int = knob(20, "Neighbours of the cosine kNN vote.", "Metrics", min=1)
    cv_folds: int = knob(5, "Study-grouped cross-validation folds that choose the probes' regularisation.", "Metrics", min=2)
    top_pairs: int = knob(12, "Most distant pairs shown in top_pairs.png.", "Metrics", min=0)
    # run
    batch_size: int = knob(128, "Pairs per forward pass (2x patches).", "Run", min=1)
    num_workers: int = knob(1, "Worker processes that read and decode the shards while the model runs (0: in the main process).", "Run", min=0)
    device: str = knob("auto", "cpu, cuda, cuda:N or auto (cuda when available).", "Run")

    @property
    def bootstrap(self):
        from train.metrics import Bootstrap

        return Bootstrap(self.n_boot, self.seed)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> "EvaluateConfig":
        """Raise `ConfigError` naming the flag to fix for the first invalid value; returns self."""
        check_knobs(self)
        checks = [
            (self.shards or self.manifest, "no_data", "give --shards DIR or --manifest samples.parquet"),
            (not self.detection_only or self.manifest, "bad_option",
             "--detection-only selects the test split from --manifest: give --manifest samples.parquet"),
        ]
        refuse_first(checks)
        return self
