"""`prep inspect`: the QA picture of one (study, view) pair, to check the image core by eye.

The options are generated from the build's own knobs (`pipelines.plan.BuildOptions`' input knobs and
`prep.config.PrepConfig`), so `prep inspect` with the flags of a `prep build-shards` run draws the pair that build
made: the same images (its re-take rule and header checks, `pipelines.plan.plan_pairs`), the same image core and
registration, and the same patch samples (the pair's seed derived from --seed as the build derives it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from pipelines.plan import BuildOptions
from prep.config import PrepConfig
from prep.knobs import ConfigError, check_knobs, config_kwargs, generated_command, knob, knob_parameters

VIEWS = ("CC", "MLO")
# BuildOptions' knobs that shape shards, not the pair: not options of `prep inspect`
SHARD_KNOBS = ("codec", "shard_max_samples", "shard_max_bytes", "group_pairs")


@dataclass(frozen=True)
class InspectRun:
    """Which pair to draw and where to write it."""

    study: str = knob(help="study_id to show (as in the build's manifests).", panel="Input")
    root: Path | None = knob(None, "Archive root, as for build-shards. Required unless --from-build.", "Input")
    from_build: str | None = knob(
        None, "Manifest folder or URL of a finished build: its archive root (unless --root), dataset and every "
        "image-core option come from its build.json, so the picture is that build's pair (leave those options "
        "out). Default: none (the options below).", "Input")
    view: str = knob("CC", "View to pair: CC or MLO.", "Input", choices=VIEWS)
    out: Path = knob(Path("qa.png"), "Output PNG path.", "Output")


def _planned_pair(run: InspectRun, options: BuildOptions):
    """The (left, right) ImageRecords the build pairs for (study, view), or QAError saying why none."""
    from pipelines.plan import BuildError, load_records, plan_pairs
    from prep.datasets import DatasetError
    from prep.qa import QAError

    try:
        records = load_records(options.dataset, run.root, None, options.pair_by, study_id=run.study)
    except (BuildError, DatasetError) as exc:
        raise QAError(exc.reason, exc.detail) from None
    if not records:
        raise QAError("study_not_found", f"no images of study {run.study!r} under {run.root}")
    pairs, rejects = plan_pairs(records, options.assume_spacing_mm)
    for left, right, _choice in pairs:
        if left.view == run.view:
            return left, right
    why = {f"{r['laterality']}-{r['view']} {r['reason']}": r["detail"]
           for r in rejects if r["view"] in (run.view, None)}
    raise QAError("pair_incomplete", f"study {run.study!r} has no usable {run.view} pair"
                  + "".join(f"; {what}: {detail}" for what, detail in sorted(why.items())))


def _recorded_build(manifests: str, given: BuildOptions) -> tuple[BuildOptions, Path]:
    """(the build's options, its archive root) from build.json in `manifests`; `given` (the command line's) must
    be the defaults, since the build's own values are the point."""
    import json

    from prep.knobs import option_name
    from prep.qa import QAError
    from prep.storage import StorageError, location

    try:
        recorded = json.loads((location(manifests) / "build.json").read_text())
        build = BuildOptions.from_dict(recorded["config"])
    except (StorageError, OSError, KeyError, TypeError, ValueError) as exc:
        raise QAError("no_build", f"--from-build {manifests}: no readable build.json of a build ({exc})") from None
    defaults = BuildOptions()
    changed = [option_name(f) for config, default in ((given, defaults), (given.prep, defaults.prep))
               for f in fields(config) if f.name not in SHARD_KNOBS and f.name != "prep"
               and getattr(config, f.name) != getattr(default, f.name)]
    if changed:
        raise ConfigError("bad_option", f"--from-build takes the build's own options: leave out {', '.join(changed)}")
    return build, Path(recorded["root"])


def inspect(**options) -> None:
    """Draw both breasts as stored, the canonical masks, the registered overlay and the sampled patch pairs.

    Give the build's flags, or --from-build with its manifest folder, to see what that build did (defaults: the
    build's defaults). Exit status: 0 drawn; 1 the pair cannot be drawn (reason on stderr); 2 bad option.
    """
    from pipelines.plan import pair_seed
    from prep.io import atomic_open
    from prep.pairs import load_image_input
    from prep.qa import QAError, render_pair_qa

    console = Console(stderr=True)
    try:
        run = InspectRun(**config_kwargs(InspectRun, {**options, "view": str(options["view"]).upper()}))
        check_knobs(run)
        prep = PrepConfig(**config_kwargs(PrepConfig, options))
        build = BuildOptions(**config_kwargs(BuildOptions, options), prep=prep)
        if run.from_build is not None:
            build, root = _recorded_build(run.from_build, build)
            run = replace(run, root=run.root or root)
        if run.root is None:
            raise ConfigError("bad_option", "--root is required (or --from-build MANIFESTS)")
    except ValueError as exc:  # a ConfigError names its reason; any other ValueError is a bad value
        message = str(exc) if isinstance(exc, ConfigError) else f"bad_option: {exc}"
        console.print(f"prep inspect: {escape(message)}", soft_wrap=True)
        raise typer.Exit(2) from None
    except QAError as exc:
        console.print(f"prep inspect: {exc.reason}: {escape(exc.detail)}", soft_wrap=True)
        raise typer.Exit(1) from None
    try:
        with console.status(f"loading {run.study} {run.view}"):
            left_record, right_record = _planned_pair(run, build)
            sides = []
            for record in (left_record, right_record):
                try:
                    sides.append(load_image_input(record, build.assume_spacing_mm))
                except Exception as exc:  # noqa: BLE001 - UnsupportedImage and friends: one line for the CLI
                    raise QAError("decode_failed", f"{record.rel_path}: {exc}") from exc
        with console.status("canonicalising, registering, sampling"):
            seed = pair_seed(build, left_record)
            fig, result = render_pair_qa(sides[0], sides[1], build.prep, seed)
        with atomic_open(run.out) as handle:
            fig.savefig(handle, format="png")
    except QAError as exc:
        console.print(f"prep inspect: {exc.reason}: {escape(exc.detail)}", soft_wrap=True)
        raise typer.Exit(1) from None
    status = "ok" if result.error is None else f"no samples ({result.error})"
    console.print(f"wrote {run.out}: {len(result.samples)} samples, {status} "
                  f"(images {left_record.image_id} / {right_record.image_id}, seed {seed})", soft_wrap=True)


generated_command(inspect, knob_parameters(InspectRun), knob_parameters(BuildOptions, skip=SHARD_KNOBS),
                  knob_parameters(PrepConfig), panels=("Input", "Output", "Image core"))
